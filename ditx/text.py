"""Text encoders: captions -> context tokens for the backbone's cross-attention.

The contract is :class:`TextEncoder`; ``hf-text`` wraps transformers' encoders (T5, UMT5,
CLIP's text tower) loaded with ``from_pretrained(path or hub id)``, the way PixArt, Open-Sora
and Wan (T5/UMT5) and SD3 (CLIP, whose pooled embedding joins the timestep condition) do.
Nothing is downloaded unless the id names the hub; a local folder written with
``save_pretrained`` loads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditx.registry import text_encoders

# kind -> (transformers class, whether it has a pooled/projected embedding)
MODEL_CLASSES = {
    "t5": ("T5EncoderModel", False),
    "umt5": ("UMT5EncoderModel", False),
    "clip": ("CLIPTextModelWithProjection", True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextEmbedding:
    """What a text encoder gives the backbone for a batch of captions."""

    tokens: Tensor  # (B, L, D) float, one row per caption, padded to max_length
    mask: Tensor  # (B, L) bool, True at real tokens (attend), False at padding
    pooled: Tensor | None = None  # (B, P): one vector per caption (CLIP), None when the encoder has none

    def to(self, device: torch.device | str) -> TextEmbedding:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextEmbedding(self.tokens.to(device), self.mask.to(device), pooled)

    def model_kwargs(self, pooled: bool = True) -> dict[str, Tensor]:
        """The DiT's keyword arguments for this condition: ``context``, ``context_mask`` (and ``pooled``)."""
        out = {"context": self.tokens, "context_mask": self.mask}
        if pooled and self.pooled is not None:
            out["pooled"] = self.pooled
        return out


class TextEncoder(nn.Module):
    """The text encoder contract (``ditx.registry.text_encoders`` builds subclasses of it).

    - ``encode(captions) -> TextEmbedding``: ``tokens`` ``(B, L, dim)`` with ``L =
      max_length`` and a ``mask`` (True at real tokens), and ``pooled`` ``(B, pooled_dim)``
      when the encoder has one; the empty caption ``""`` is the unconditional one;
    - ``dim``, ``max_length``, ``pooled_dim`` (None without a pooled embedding);
    - frozen: eval mode, no gradients; its weights never enter training checkpoints.
    """

    dim: int
    max_length: int
    pooled_dim: int | None = None

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        raise NotImplementedError(f"{type(self).__name__} must implement encode")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError('text encoders need transformers: pip install "ditx[text]"') from e
    return transformers


@text_encoders.register("hf-text")
class HFTextEncoder(TextEncoder):
    """A transformers text encoder and its tokenizer, frozen.

    Args:
        pretrained: a local folder (``save_pretrained``) or a hub id, e.g.
            ``google/t5-v1_1-xxl``, ``google/umt5-xxl``, ``openai/clip-vit-large-patch14``.
        kind: ``t5``, ``umt5`` or ``clip`` (the model class to load).
        max_length: captions are padded or truncated to this many tokens.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (weights and outputs).
        tokenizer: where the tokenizer is, when not beside the model.
        subfolder: the model's subfolder of ``pretrained`` (diffusers pipelines: ``text_encoder``).
    """

    def __init__(
        self,
        pretrained: str,
        kind: str = "t5",
        max_length: int = 120,
        dtype: str = "float32",
        tokenizer: str | None = None,
        subfolder: str | None = None,
    ):
        super().__init__()
        if kind not in MODEL_CLASSES:
            raise ValueError(f"text encoder kind must be one of {', '.join(MODEL_CLASSES)}, got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"text encoder dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"text encoder max_length must be a positive integer, got {max_length!r}")
        transformers = _transformers()
        class_name, has_pooled = MODEL_CLASSES[kind]
        extra = {"subfolder": subfolder} if subfolder else {}
        pretrained = os.path.expanduser(pretrained)  # "~/models/t5" as a shell would read it
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(tokenizer or pretrained))
        model = getattr(transformers, class_name).from_pretrained(pretrained, torch_dtype=DTYPES[dtype], **extra)
        self.model = model.eval().requires_grad_(False)
        self.kind, self.max_length, self.pretrained = kind, max_length, str(pretrained)
        config = model.config
        self.dim = int(config.hidden_size if kind == "clip" else config.d_model)
        self.pooled_dim = int(config.projection_dim) if has_pooled else None

    def train(self, mode: bool = True) -> HFTextEncoder:
        return super().train(False)  # frozen, whatever wraps it asks

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")  # fmt: skip
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask)
        pooled = out.text_embeds if self.pooled_dim is not None else None
        return TextEmbedding(out.last_hidden_state, mask.bool(), pooled)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, pretrained={self.pretrained!r}, dim={self.dim}, max_length={self.max_length}"


# ---------------------------------------------------------------------------------------
# A tiny T5 made locally (tiny recipes and tests: nothing to download)
# ---------------------------------------------------------------------------------------

SPECIAL_WORDS = ("<pad>", "</s>", "<unk>")


def word_level_tokenizer(words: Sequence[str]):
    """A transformers fast tokenizer over ``words`` made with the ``tokenizers`` library:
    lower-cased, split on whitespace and punctuation, unknown words to ``<unk>``, every
    caption ended by ``</s>`` (as T5's is), padding ``<pad>`` (id 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    transformers = _transformers()
    vocabulary = list(SPECIAL_WORDS) + sorted({w.lower() for w in words} - set(SPECIAL_WORDS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")  # fmt: skip


def save_tiny_t5(path: str | Path, words: Sequence[str], dim: int = 64, layers: int = 2, heads: int = 4,
                 seed: int = 0) -> Path:  # fmt: skip
    """Write a randomly initialised ``T5EncoderModel`` and a word-level tokenizer over ``words``
    to ``path`` with ``save_pretrained`` (atomically): a stand-in for a real T5 that loads
    through exactly the same ``from_pretrained`` path. The same arguments give the same files."""
    from ditx.files import atomic_write

    transformers = _transformers()
    tokenizer = word_level_tokenizer(words)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                                   num_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.T5EncoderModel(config)
    try:
        with atomic_write(path, directory=True, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:  # written by another process meanwhile (the same arguments: the same files)
        if not (Path(path) / "config.json").is_file():
            raise
    return Path(path)


@text_encoders.register("tiny-t5")
def tiny_t5(words: list[str], max_length: int = 16, dim: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
            path: str | None = None) -> HFTextEncoder:  # fmt: skip
    """A tiny T5 over the vocabulary ``words``, written once by :func:`save_tiny_t5` to ``path``
    (default ``$DITX_CACHE/text-encoders/tiny-t5-<settings hash>``) and loaded from there by
    ``hf-text``: the tiny recipes' text encoder, through the real loading path. Its random
    weights keep each word's identity in its tokens, which is all a tiny recipe needs."""
    from ditx.files import ditx_cache_dir

    settings = {"words": sorted({w.lower() for w in words}), "dim": dim, "layers": layers, "heads": heads,
                "seed": seed, "transformers": _transformers().__version__}  # fmt: skip
    if path is None:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = str(ditx_cache_dir("text-encoders") / f"tiny-t5-{digest}")
    written = Path(path) / "model.safetensors"
    if not written.is_file():
        if _distributed_rank() in (None, 0):
            save_tiny_t5(path, words, dim, layers, heads, seed)
        else:  # transformers saves on rank 0 only: wait for its files
            _wait_for(written, what="the tiny T5 that process 0 writes")
    return HFTextEncoder(path, kind="t5", max_length=max_length)


def _distributed_rank() -> int | None:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _wait_for(path: Path, what: str, timeout: float = 600.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s ({what})")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------
# Cached caption embeddings
# ---------------------------------------------------------------------------------------

CAPTION_TABLE_FORMAT = "ditx-caption-embeddings"


def text_encoder_key(component: Any) -> dict[str, Any]:
    """A text encoder's identity without loading it: its recipe settings (kind, ``max_length``,
    dtype, ...) and, for arguments that name local folders or files (``pretrained``,
    ``tokenizer``), each file's path, size and modification time. Part of the identity of
    cached caption embeddings, so retrained or replaced weights at the same path re-encode."""
    from ditx.files import files_fingerprint

    settings = component.to_dict()
    files = {}
    for arg in ("pretrained", "tokenizer"):
        value = settings.get(arg)
        if isinstance(value, str) and os.path.exists(value):
            root = Path(value)
            if root.is_dir():
                rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                files[arg] = files_fingerprint(root, rel)
            else:
                files[arg] = files_fingerprint(root.parent, [root.name])
    return {"text_encoder": settings, "files": files}


def caption_table_name(key: dict[str, Any]) -> str:
    """The file name of a cache's caption embeddings for the encoder ``key`` (``text_encoder_key``)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"text-{digest[:16]}.safetensors"


class CaptionTable(TextEncoder):
    """Caption embeddings computed once (``ditx cache-latents``), looked up instead of encoding.

    It follows the text encoder contract, so training reads it where it would call the
    encoder: ``encode(captions)`` returns the stored rows. The empty caption (the
    unconditional one, for caption dropout) is always stored. A caption that is not in the
    table is an error naming it: the cache was made for other captions.
    """

    def __init__(self, captions: Sequence[str], embedding: TextEmbedding, key: dict[str, Any] | None = None):
        super().__init__()
        if len(set(captions)) != len(captions) or len(captions) != len(embedding.tokens):
            raise ValueError("a caption table needs distinct captions, one embedding row each")
        self.captions = list(captions)
        self.row = {c: i for i, c in enumerate(self.captions)}
        self.embedding = embedding
        self.key = key
        self.dim, self.max_length = embedding.tokens.shape[-1], embedding.tokens.shape[1]
        self.pooled_dim = None if embedding.pooled is None else embedding.pooled.shape[-1]

    @classmethod
    @torch.no_grad()
    def build(cls, encoder: TextEncoder, captions: Sequence[str], batch_size: int = 256,
              key: dict[str, Any] | None = None, progress: bool = False) -> CaptionTable:  # fmt: skip
        """Encode each distinct caption of ``captions`` (and ``""``) once with ``encoder``."""
        unique = sorted(set(captions) | {""})
        starts = range(0, len(unique), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="cache captions", unit="batch")
        parts = [encoder.encode(unique[i : i + batch_size]) for i in starts]
        # kept in the encoder's dtype (a bf16 T5 caches bf16 tokens: half the memory)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled.cpu() for p in parts])
        embedding = TextEmbedding(torch.cat([p.tokens.cpu() for p in parts]),
                                  torch.cat([p.mask.cpu() for p in parts]), pooled)  # fmt: skip
        return cls(unique, embedding, key)

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        missing = [c for c in captions if c not in self.row]
        if missing:
            raise KeyError(
                f"caption {missing[0]!r} is not among the {len(self.captions)} cached caption embeddings; "
                f"re-run `ditx cache-latents` for this recipe"
            )
        rows = torch.tensor([self.row[c] for c in captions], dtype=torch.long)
        e = self.embedding
        return TextEmbedding(e.tokens[rows], e.mask[rows], None if e.pooled is None else e.pooled[rows])

    def save(self, path: str | Path) -> Path:
        """Write the table atomically as one safetensors file (captions and key in its metadata)."""
        from safetensors.torch import save_file

        from ditx.files import atomic_write

        e = self.embedding
        tensors = {"tokens": e.tokens.contiguous(), "mask": e.mask.contiguous()}
        if e.pooled is not None:
            tensors["pooled"] = e.pooled.contiguous()
        metadata = {"format": CAPTION_TABLE_FORMAT, "captions": json.dumps(self.captions),
                    "key": json.dumps(self.key, sort_keys=True)}  # fmt: skip
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTable:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != CAPTION_TABLE_FORMAT:
            raise ValueError(f"{path} is not a ditx caption-embedding file")
        tensors = load_file(str(path))
        embedding = TextEmbedding(tensors["tokens"], tensors["mask"], tensors.get("pooled"))
        return cls(json.loads(metadata["captions"]), embedding, json.loads(metadata["key"]))

    def extra_repr(self) -> str:
        return f"captions={len(self.captions)}, dim={self.dim}, max_length={self.max_length}"
