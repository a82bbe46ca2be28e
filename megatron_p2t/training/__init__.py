"""What both training stages share (losses, the DeepSpeed engine over the Layout's groups) and the stages."""
