"""Shared fixtures: tiny models of several HF families built from configs, and a tiny trained tokenizer.

Nothing here touches a hub: tokenizers are trained in-process, models are random-initialised from configs.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris. A. B. C. D. Answer with the letter only.",
    "Which planet is largest? Jupiter is the largest planet in the solar system.",
    "Answer the question briefly, with just the answer. The quick brown fox jumps over the lazy dog.",
    "Question: how many legs does a spider have? Answer: eight. 0 1 2 3 4 5 6 7 8 9",
] * 20

# family -> config class and the kwargs that make it tiny
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, max_position_embeddings=256)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=32)),
}


def build_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<eos>", model_input_names=["input_ids", "attention_mask"])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(vocab_size=vocab_size, **{**kwargs, **overrides})
    config.pad_token_id = 1
    config.eos_token_id = 2
    config.bos_token_id = 2
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def qwen_model(tokenizer):
    return build_model("qwen2", len(tokenizer))
