"""Decoder model families (Llama 2/3, Mistral, Qwen2/2.5/3); see issue 3."""
