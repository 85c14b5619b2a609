"""Multi-device strategy for phases without trainable parameters (phase 1, data-free).

Plain DDP refuses a module with no parameter to synchronise; the data-free compression only needs
DDP's processes and distributed sampler (each device compresses its share of the matrices). This
strategy is DDP that leaves such a module unwrapped; modules with trainable parameters are wrapped
as usual. Registered as `--trainer.strategy ddp_matrices`.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class MatrixParallelStrategy(DDPStrategy):
    """DDP whose processes share out the matrices; no gradient synchronisation when nothing trains."""

    strategy_name = "ddp_matrices"

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


if "ddp_matrices" not in StrategyRegistry:
    StrategyRegistry.register("ddp_matrices", MatrixParallelStrategy,
                              description="DDP processes sharing out matrices (data-free phase 1)")
