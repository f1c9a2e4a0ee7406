"""TorchServe glue for the gpt_fast_mixtral engine: the handler and its request schema."""
