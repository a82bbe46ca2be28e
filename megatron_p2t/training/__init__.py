"""What both training stages share: losses, (later) the DeepSpeed engine over megatron-core's groups."""
