"""Training the recyclable module: corpora and prompt files (`data`), the losses (`objectives`) and the loops
(`train`: joint training and retrofitting a module onto a frozen base)."""
