"""Training recipes as plain functions and modules (no Lightning): the patch autoencoder's recipe and
the learning-rate schedule every phase uses. The LightningModules in `reallm.modules` wire them."""
