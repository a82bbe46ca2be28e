"""The names model.attention_kernel takes (no megatron import, so configs check them without the training stack)."""

# model.attention_kernel: the kernel for packed rows (transformer/attention.py): the decoder's, and the unpadded
# batches of ESM (transformer/padded_attention.py) and the text side; rows without segments take one SDPA call
ATTENTION_KERNELS = {
    "auto": "the first of flash_attn, torch_varlen and sdpa that can run",
    "flash_attn": "flash-attn's varlen kernel: needs CUDA, fp16/bf16 and the flash-attn package",
    "torch_varlen": "PyTorch's own varlen kernel (torch.nn.attention.varlen): needs CUDA on sm80+, fp16/bf16, "
                    "PyTorch 2.9+ and no attention dropout",
    "sdpa": "SDPA once per sample: runs anywhere",
}
