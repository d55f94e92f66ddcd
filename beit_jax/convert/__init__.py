"""Checkpoint interop with the PyTorch world: microsoft/unilm, HuggingFace, OpenAI DALL-E.

  python -m beit_jax.convert --from=unilm|hf|dalle|beit_jax --to=beit_jax|hf SRC DST

Importers turn foreign weights into beit-jax params (saved with
`checkpoint.save_params`, so `config.init_from` / `config.tokenizer.init_from` start
from them); `hf.save_pretrained` writes a folder transformers loads. torch is imported
only to read `.pth` / `.bin` / `.pkl` files; safetensors and beit-jax checkpoints need
no torch.
"""
