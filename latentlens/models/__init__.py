"""Architecture adapters: the one place that knows where a model keeps its language model, layers and tokenizer."""
