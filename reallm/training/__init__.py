"""Training recipes as plain functions and modules (no Lightning): the patch autoencoder's recipe, the
learning-rate schedule every phase uses, the calibration statistics of calibration-aware phase 1 and the
distillation loss and teacher cache of phase 3. The LightningModules in `reallm.modules` wire them."""
