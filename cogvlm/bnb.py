"""Reading bitsandbytes 4-bit checkpoints (the published CogVLM2 int4 copies) in plain PyTorch.

bitsandbytes stores a 4-bit linear weight `W` as four state-dict entries (docs/spec/cogvlm2.md section 1):
`W` uint8, two 4-bit codes per byte over the flattened weight, the first value in the high
nibble; `W.absmax` fp32, one scale per block of `blocksize` values; `W.quant_map` the 16 fp32
code values (fp4 or nf4); `W.quant_state.bitsandbytes__<type>` the UTF-8 bytes of a JSON record
with the quant type, blocksize, dtype and shape. A value is `quant_map[code] * absmax[block]`,
computed in fp32 and cast to the record's dtype, as bitsandbytes' own dequantization does.
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import torch

from .errors import Bnb4bitError

STATE_KEY = ".quant_state.bitsandbytes__"
PARTS = (".absmax", ".quant_map")


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
               state: dict) -> torch.Tensor:
    """One 4-bit weight back in its original shape and dtype."""
    shape, blocksize = tuple(state["shape"]), int(state["blocksize"])
    n = math.prod(shape)
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)  # bnb's quant_storage option
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)[:n].long()
    values = quant_map.float()[codes]
    blocks = -(-n // blocksize)
    values = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    values = (values * absmax.float().view(blocks, 1)).reshape(-1)[:n]
    return values.view(shape).to(getattr(torch, state["dtype"]))


def quant_state(record: torch.Tensor) -> dict:
    return json.loads(bytes(record.to(torch.uint8).tolist()).decode("utf-8"))


def unpack_state(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of `state`, each 4-bit weight unpacked (one at a time, so a
    caller can move them on before the next one takes memory); its companions are consumed."""
    if any(name.endswith(".SCB") for name in state):
        raise Bnb4bitError("this is a bitsandbytes 8-bit checkpoint; only the 4-bit (fp4/nf4) format is read")
    for name, tensor in state.items():
        if STATE_KEY in name or name.endswith(PARTS):
            continue
        record = next((state[name + STATE_KEY + kind] for kind in ("fp4", "nf4") if name + STATE_KEY + kind in state),
                      None)
        if record is None:
            yield name, tensor
            continue
        info = quant_state(record)
        if "nested_blocksize" in info or name + ".nested_absmax" in state:
            raise Bnb4bitError(f"{name} is double-quantized (bnb_4bit_use_double_quant), which is not read")
        yield name, dequantize(tensor, state[name + ".absmax"], state[name + ".quant_map"], info)
