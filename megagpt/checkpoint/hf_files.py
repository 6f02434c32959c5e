"""The one reader of a Hugging Face model directory: config.json plus model.safetensors, or
model.safetensors.index.json and the shards its weight map names. Tensors are read lazily with
safe_open (nothing is unpickled); close() unmaps the files (mapped pages count as resident).
write_hf_tokenizer writes the tokenizer files of an exported directory."""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from .hf import ConversionError
from .store import CheckpointError, inside, read_json

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


class HFDirectory:
    def __init__(self, path: str):
        self.dir, self.handles = path, {}
        self.config = read_json(os.path.join(path, "config.json"), f"{path}/config.json")
        if os.path.isfile(os.path.join(path, INDEX)):
            weight_map = read_json(os.path.join(path, INDEX), f"{path}/{INDEX}").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{path}/{INDEX}: no weight_map")
            self.index, self.weight_map = INDEX, weight_map
        elif os.path.isfile(os.path.join(path, SINGLE)):
            self.index, self.weight_map = None, None
        else:
            raise ConversionError(f"{path}: no {SINGLE} or {INDEX}")

    def __enter__(self) -> "HFDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.handles.clear()

    def has(self, hf_name: str) -> bool:
        return hf_name in (self.weight_map if self.weight_map is not None else self._open(SINGLE).keys())

    def file_of(self, hf_name: str) -> str:
        """The file holding hf_name: a plain name inside the directory, else a one-line error."""
        fname = SINGLE if self.weight_map is None else self.weight_map.get(hf_name)
        if fname is None:
            raise ConversionError(f"{hf_name}: not in the checkpoint's weight map")
        try:
            inside(self.dir, fname, INDEX)
        except CheckpointError as e:
            raise ConversionError(f"{hf_name}: not in the checkpoint's weight map as a file inside it ({e})") from None
        return fname

    def _open(self, fname: str):
        if fname not in self.handles:
            full = os.path.join(self.dir, fname)
            if not os.path.isfile(full):
                raise ConversionError(f"{self.dir}: {fname} is named by {self.index} but missing")
            try:
                self.handles[fname] = safe_open(full, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{full}: unreadable safetensors file ({e})") from None
        return self.handles[fname]

    def _handle(self, hf_name: str):
        fname = self.file_of(hf_name)
        handle = self._open(fname)
        if hf_name not in handle.keys():
            raise ConversionError(f"{self.dir}/{fname}: no tensor {hf_name}, though {self.index or fname} lists it")
        return handle

    def shape(self, hf_name: str) -> tuple:
        return tuple(self._handle(hf_name).get_slice(hf_name).get_shape())

    def dtype(self, hf_name: str) -> str:
        """The safetensors dtype name ("F32", "BF16", ...)."""
        return self._handle(hf_name).get_slice(hf_name).get_dtype()

    def get(self, hf_name: str) -> torch.Tensor:
        return self._handle(hf_name).get_tensor(hf_name)


def write_hf_tokenizer(out_dir: str, tokenizer_json: str, cfg: ModelConfig, eos_token: str = "<|endoftext|>"):
    """Copy a tokenizers tokenizer.json into an HF model directory with a minimal tokenizer_config.json,
    so AutoTokenizer loads it offline. A tokenizer with the chat tokens (SFT, DPO, PPO, reward models)
    gets the chat template (align/chat.py CHAT_TEMPLATE). The eos token is also the pad token: HF's
    sequence classification scores the last token that is not padding. Returns the eos token's id
    (None when it has no such token) and the end-of-turn token's (None without a chat template)."""
    from tokenizers import Tokenizer

    from ..align.chat import CHAT_TEMPLATE, CHAT_TOKENS, END_TOKEN
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
        raise ConversionError(f"{tokenizer_json}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_json}: {n} tokens, more than model.vocab_size={cfg.vocab_size}")
    with open(tokenizer_json, "rb") as src, open(os.path.join(out_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    eos = tok.token_to_id(eos_token)
    chat = all(tok.token_to_id(t) is not None for t in CHAT_TOKENS)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
              "clean_up_tokenization_spaces": False,
              **({"eos_token": eos_token, "pad_token": eos_token} if eos is not None else {}),
              **({"chat_template": CHAT_TEMPLATE} if chat else {})}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return eos, tok.token_to_id(END_TOKEN) if chat else None
