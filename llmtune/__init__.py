"""llmtune: fine-tune pretrained transformer encoders from small composable pieces."""
