"""The flags every verb shares (which model, how to load it, how to sample) and their conversion
into `LoadOptions` and sampling overrides.

`cogvlm chat`, `web`, `serve`, `caption` and `eval` all take the same model and sampling flags;
they live here, in one place, so a new loading option (quantization, several GPUs) reaches every
surface at once. The checks live below: `LoadOptions` checks option combinations, `SamplingParams`
the sampling values; this module only turns their errors into the CLI's one-line messages.
"""

from __future__ import annotations

import argparse
import math
import socket
from typing import TYPE_CHECKING, Any

from ..config import DEFAULT_MODEL, TEMPLATE_ALIASES, TEMPLATES
from ..errors import UsageError
from ..generate import SamplingParams
from ..options import TP_TIMEOUT, LoadOptions
from ..quantize import BITS, GROUP_SIZES, VISION_BITS

if TYPE_CHECKING:
    from ..api import CogVLM
    from ..config import CogVLMConfig

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "max_new_tokens", "max_length", "seed")
SAMPLING_HELP = {
    "temperature": "sampling temperature (0 = greedy)", "top_p": "nucleus sampling mass",
    "top_k": "sample among the k likeliest tokens (1 = greedy, 0 = no limit)",
    "max_new_tokens": "longest answer in tokens (default: until max_length)",
    "max_length": "longest prompt + answer in tokens, image slots included (default: the model's context, "
                  "2048 for CogVLM, 8192 for CogVLM2)", "seed": "random seed for sampling",
}


def spellings(name: str) -> list[str]:
    """The authors' underscore flag name and its dashed twin, so both habits work."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Which model to load, how, and the default sampling settings."""
    parser.add_argument(*spellings("model"), *spellings("from_pretrained"), dest="model", default=DEFAULT_MODEL,
                        metavar="NAME_OR_PATH", help=f"registry name, hub id or folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--template", "--version", choices=TEMPLATES, type=lambda v: TEMPLATE_ALIASES.get(v, v),
                        help="prompt template (default: the model's; the authors' chat_old is chat)")
    dtype = parser.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", dest="dtype", action="store_const", const="bf16", help="bfloat16 weights")
    dtype.add_argument("--fp16", dest="dtype", action="store_const", const="fp16", help="float16 weights")
    add_quant_flags(parser)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_tp_flag(parser)
    parser.add_argument("--adapter", metavar="PATH",
                        help="apply the LoRA adapter in PATH (what finetune --lora writes) over the model, float or "
                             "quantized, without merging it (reads adapter_model.safetensors only)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile: faster decoding after some seconds of "
                             "compiling; needs a C++ compiler on CPU, and holds a packed copy of the language "
                             "weights per frozen graph (batches; in bf16 batch 1 too); with --quant it fuses the small "
                             "ops around the packed kernels (int4 decoding 1.7-1.9x on CPU)")
    parser.add_argument("--tokenizer", *spellings("local_tokenizer"), dest="tokenizer", metavar="PATH",
                        help="sentencepiece tokenizer.model (CogVLM) or tokenizer.json (CogVLM2) (default: the one "
                             "next to the weights)")
    defaults = SamplingParams()
    for name in SAMPLING_FLAGS:
        kind = float if name in ("temperature", "top_p") else int
        default = None if name == "max_length" else getattr(defaults, name)  # max_length: in its help
        parser.add_argument(*spellings(name), type=kind, metavar="N",
                            help=SAMPLING_HELP[name] + ("" if default is None else f" (default {default})"))


# cogvlm-chat-v1.1's plan (cogvlm.plan.weight_bytes; tests/test_plan.py keeps these in step)
MEMORY_PLAN = ("weights of cogvlm-chat-v1.1: bf16 35.3 GB, --quant 8 22.2 GB, --quant 4 16.1 GB, "
               "--quant 4 --quant-vision 8 11.6 GB; KV cache 1.07 GB per 2048-token row (bf16)")


def add_quant_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Weight-only quantization (docs/quantization.md): the one spelling of every verb that
    loads, writes or plans a model."""
    parser.add_argument("--quant", type=int, choices=BITS, required=required,
                        help="quantize the language weights (both experts, output head) while loading, on CPU or "
                             "CUDA: 8 = int8 per output row, 4 = int4 in groups; activations run in bf16, the "
                             "packed kernels' dtype. A checkpoint made by `cogvlm quantize` loads quantized "
                             f"without this flag. {MEMORY_PLAN}")
    parser.add_argument("--group-size", "--quant-group-size", dest="group_size", type=int, choices=GROUP_SIZES,
                        default=128, metavar="N",
                        help=f"inputs per int4 scale: {', '.join(map(str, GROUP_SIZES))} (default 128)")
    parser.add_argument("--quant-vision", type=int, choices=VISION_BITS,
                        help="also int8 for the ViT and adapter linears (default: full precision, as the authors "
                             "ship it; costs a little accuracy, see docs/quantization.md)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse prints the one-line usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (int() of nan or inf was a traceback)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, not {value}")
    return value


def add_tp_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=positive_int, metavar="N",
                        help="split the model over N GPUs (or N CPU processes) with tensor parallelism; "
                             "the N-1 other processes are started for you (under torchrun: its world size). "
                             "`cogvlm plan` says which N fits")
    parser.add_argument("--tp-timeout", type=float, default=TP_TIMEOUT, metavar="SECONDS",
                        help="with --tp: how long a collective of one model call waits for the other processes "
                             f"before all of them stop with an error naming the one that failed (default "
                             f"{TP_TIMEOUT:g}; waiting for the next request has no limit)")


def add_output_flags(parser: argparse.ArgumentParser, src_help: str | None = None) -> None:
    """The output folder of a verb that writes a checkpoint (convert, quantize, merge-lora): the
    SRC -> DST pair and shard size when `src_help` is given, and --force."""
    if src_help is not None:
        parser.add_argument("src", help=src_help)
        parser.add_argument("dst", help="output folder: new or empty (written atomically)")
        parser.add_argument("--shard-gb", type=positive_float, default=5.0, help="largest shard size in GiB (default 5)")
    parser.add_argument("--force", action="store_true",
                        help="replace a checkpoint cogvlm wrote in the output folder (a folder holding anything "
                             "else is never touched)")


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The model flags as `LoadOptions`, checked (a bad combination is one line, exit 2)."""
    return LoadOptions(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                       compile=args.compile, tp=args.tp, quant=args.quant, group_size=args.group_size,
                       quant_vision=args.quant_vision, tp_timeout=args.tp_timeout, adapter=args.adapter)


def sampling_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling values given on the command line (overrides of the model's defaults, whose
    `max_length` is the model's context), checked before the (slow) model load."""
    chosen = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    try:
        SamplingParams.build(**chosen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return chosen


def sampling_params(config: CogVLMConfig, sampling: dict[str, Any]) -> SamplingParams:
    """The sampling flags over the model's defaults; a --max_length past the model's positions is
    refused here, before the first question."""
    from ..api import default_sampling

    positions = config.max_position_embeddings
    if sampling.get("max_length", 0) > positions:
        raise UsageError(f"--max_length {sampling['max_length']} is past this model's {positions} positions; "
                         f"use at most {positions}")
    return SamplingParams.build(default_sampling(config), **sampling)


def load_model(options: LoadOptions, sampling: dict[str, Any]) -> CogVLM:
    """The model `options` name, with the sampling flags as its defaults: every job then samples
    with `vlm.defaults`."""
    from ..api import CogVLM

    vlm = CogVLM.from_pretrained(options)
    vlm.defaults = sampling_params(vlm.config, sampling)
    return vlm


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on --host and --port, bound before the model loads: a host that names no
    address of this machine or a port in use is the user's one-line error now, not the web
    server's failure minutes later (uvicorn exits 3; Gradio retries a bad host for ever)."""
    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: restart without waiting
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise UsageError(f"cannot listen on {host}{f' port {port}' if port else ''}: {e.strerror or e}") from None
