"""Inference sub-commands of `mupd` (stain, generate); training, data, eval and serve live
beside their own code and register themselves the same way."""
