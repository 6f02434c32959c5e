#!/usr/bin/env python
"""Generate text from a megagpt checkpoint (any saved layout, resharded on load) or an HF Llama directory.

    python tools/generate.py --load runs/tiny --prompt "ROMEO." --max-new-tokens 50 --greedy
    python tools/generate.py --load hf_out --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 1 --print-ids
    torchrun --nproc-per-node 4 tools/generate.py --load runs/tiny --tp 2 --pp 2 --prompt-file q.txt
    python tools/generate.py --load runs/tiny --prompt "Q: 2+3=" --temperature 0.7 --self-consistency 10 \\
        --answer-regex "A: *(\\d+)"
    python tools/generate.py --load multimodal_run/mixed --prompt "<image>" --image digit.png --greedy

The prompt comes from --prompt, --prompt-file, --prompt-ids or stdin. Text streams to stdout token by
token (global rank 0 prints; other DP replicas generate the same). --print-ids prints the generated ids,
space-separated, as the last line. Exit codes: 0 ok, 2 bad input or arguments (one line on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megagpt.loading import INPUT_ERRORS  # noqa: E402
from megagpt.sampling import Sampling  # noqa: E402

ERRORS = INPUT_ERRORS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, metavar="DIR", help="megagpt run/step directory or HF directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT")
    src.add_argument("--prompt-file", metavar="FILE")
    src.add_argument("--prompt-ids", metavar="IDS", help="raw token ids, comma-separated: 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when the output contains TEXT")
    p.add_argument("--no-eod", action="store_true", help="do not stop on the end-of-document token")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--print-ids", action="store_true", help="print the generated ids as the last line")
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn in the chat template "
                   "(megagpt/align/chat.py); generation stops at <|end|>")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system turn first")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an 8x8 grayscale PNG for the prompt's next <image> (repeat for several)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="a 16-bit mono WAV at 8 kHz for the prompt's next <audio> (repeat for several)")
    p.add_argument("--self-consistency", type=int, metavar="N", help="sample N chains and vote on the answer")
    p.add_argument("--answer-regex", default=r"(-?\d+(?:\.\d+)?)",
                   help="--self-consistency: the answer in each chain (its first group; last match wins)")
    return p.parse_args(argv)


def sampling_from(args) -> Sampling:
    knobs = (args.temperature, args.top_k, args.top_p)
    if args.greedy and any(k is not None for k in knobs):
        raise ValueError("--greedy: cannot be combined with --temperature/--top-k/--top-p")
    return Sampling(do_sample=any(k is not None for k in knobs),
                    temperature=1.0 if args.temperature is None else args.temperature,
                    top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed).validate()


def read_prompt(args, tok, cfg=None, media=((), ())) -> tuple[list[int], object]:
    """(prompt ids, the multimodal spec.Media of --image/--audio or None); media: load_media's tensors."""
    if args.prompt_ids is not None:
        if args.image or args.audio:
            raise ValueError("--image/--audio: need a text prompt with <image>/<audio> placeholders, not --prompt-ids")
        try:
            ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
        return ids, None
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = sys.stdin.read()
    if tok is None:
        raise ValueError("--prompt: the checkpoint has no tokenizer; pass --tokenizer FILE or use --prompt-ids")
    if args.chat:
        from megagpt.align.chat import apply_chat_template
        turns = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": text}]
        if args.image or args.audio:
            raise ValueError("--image/--audio: not combined with --chat")
        return apply_chat_template(tok, turns, add_generation_prompt=True, require_assistant=False, where="--chat")[0], None
    if args.image or args.audio or "<image>" in text or "<audio>" in text:
        from megagpt.multimodal.prompt import media_prompt
        return media_prompt(tok, cfg, text, *media, where="--prompt")
    return tok.encode(text), None


def run(args) -> int:
    from megagpt.generate import generate_ids
    from megagpt.loading import load_for_generation
    from megagpt.self_consistency import regex_extractor, self_consistency
    sampling = sampling_from(args)
    loaded = ((), ())
    if args.image or args.audio:                   # bad media files fail before the model loads
        from megagpt.multimodal.prompt import load_media
        loaded = load_media(args.image, args.audio)
    chunks, ps, tok, eod = load_for_generation(args.load, args.tp, args.pp, args.tokenizer)
    prompt, media = read_prompt(args, tok, chunks[0].cfg, loaded)
    bad = [i for i in prompt if not 0 <= i < chunks[0].cfg.vocab_size]
    if bad:
        raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary of {chunks[0].cfg.vocab_size}")
    speak = ps.rank == 0
    decode = (lambda ids: tok.decode(ids)) if tok is not None else None
    if args.stop and decode is None:
        raise ValueError("--stop: needs a tokenizer (pass --tokenizer FILE)")
    stop = (lambda ids: any(s in decode(ids) for s in args.stop)) if args.stop else None
    if args.chat:
        from megagpt.align.chat import END_TOKEN
        eod = tok.token_id(END_TOKEN)              # the template checked it exists
    kw = dict(ps=ps, eod_id=None if args.no_eod else eod, stop=stop)
    if media is not None:
        if args.self_consistency:
            raise ValueError("--self-consistency: not combined with --image/--audio")
        kw["media"] = media
    if args.self_consistency:
        extract = regex_extractor(args.answer_regex, decode or (lambda ids: " ".join(map(str, ids))))
        vote = self_consistency(chunks, prompt, args.self_consistency, args.max_new_tokens, sampling, extract, **kw)
        if speak:
            for i, a in enumerate(vote.answers):
                print(f"chain {i}: {a}")
            print(f"answer: {vote.answer}  agreement {vote.agreement:.2f} ({vote.counts})")
        return 0
    row0 = {"ids": [], "done": False, "shown": ""}

    def on_token(step_tokens, done):      # streaming: row 0's new text as each token comes
        if row0["done"]:
            return
        row0["ids"].append(int(step_tokens[0]))
        row0["done"] = bool(done[0])
        if speak and decode is not None:
            text = decode(row0["ids"])
            print(text[len(row0["shown"]):], end="", flush=True)
            row0["shown"] = text
    ids = generate_ids(chunks, [prompt], args.max_new_tokens, sampling, on_token=on_token, **kw)[0]
    if speak:
        if decode is not None:
            print()
        if args.print_ids or decode is None:
            print(" ".join(map(str, ids)))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        rc = run(args)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():  # no rank leaves while another still talks to it
            dist.barrier()
            dist.destroy_process_group()
        return rc
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"generate: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
