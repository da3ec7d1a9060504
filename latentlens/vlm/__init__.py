"""Visual tokens of vision-language models: extraction and patch geometry."""
