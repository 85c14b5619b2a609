"""ReALLM checkpoints: the two on-disk formats, saving and loading models in them, transformers, the Hub.

Modules, each imported only by the ones listed after it:

    format2.py       format version 2 (written today), a Hugging Face model directory: what config.json's
                     quantization_config and the weights files hold, the digests, reading and checking the
                     stored tensors of a layer, named adapter files, re-sealing config.json
    format1.py       format version 1 (reallm.json, earlier checkpoints): reading and checking it, its digests,
                     its adapter sets, rebuilding its model
    remote_code.py   the loader module `configuration_reallm.py` written into every checkpoint for
                     `trust_remote_code=True` users (standard library only)
    quantizer.py     the `reallm` quantization method of transformers (from_pretrained / save_pretrained);
                     importing it imports transformers' quantizer registry (seconds)
    registration.py  `import reallm` registers that method as soon as transformers' registry is imported,
                     without importing it (standard library only)
    directory.py     a checkpoint directory of either format: which format, its metadata, its weights files
    card.py          the model card (README.md) of a checkpoint
    compressed.py    save_compressed / load_compressed, adapter sets, one layer, export_dense
    hub.py           verify_checkpoint, push_to_hub, `python -m reallm.checkpoint.hub`

`format1`, `compressed` and `reallm.model.surgery` import `quantizer` inside the functions that load or save
a model, so that `import reallm` does not import transformers' quantizer registry (see `registration`).
"""
