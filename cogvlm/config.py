"""Typed model configurations and the registry of published CogVLM variants.

One `CogVLMConfig` describes a whole model (language decoder + vision encoder). The registry
maps our short names to the published checkpoints, so `load_model("cogvlm-chat-v1.1")` and
`load_model("THUDM/cogvlm-chat-hf")` mean the same thing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

TEMPLATES = ("base", "chat", "vqa", "inst")  # inst: CogAgent's ` [INST] q [/INST] ` chat
TEMPLATE_ALIASES = {"chat_old": "chat"}  # the authors' SAT code calls the v1.1 chat template chat_old
DEFAULT_MODEL = "cogvlm-tiny"  # shipped inside the package: every surface works offline


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP-E with its last layer dropped (docs/spec/cogvlm.md section 2)."""

    image_size: int = 490
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1792
    num_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    layer_norm_eps: float = 1e-6
    downsample: int = 1  # CogVLM2: 2, a 2x2 stride-2 conv merges each 2x2 block of patch features

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Patch vectors one image gives the decoder, after the downsample conv."""
        return (self.image_size // self.patch_size // self.downsample) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1


@dataclass(frozen=True)
class CrossVisionConfig:
    """CogAgent's high-resolution tower, EVA2-CLIP-L (docs/spec/cogagent.md section 7). Only the image size
    is in the published configs; the rest is hard-coded in the authors' code, hence the defaults."""

    image_size: int = 1120
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1024  # also the width cross-attention keys/values are projected from
    num_layers: int = 24  # blocks built; the last one never runs
    num_heads: int = 16
    intermediate_size: int = 2730  # int(1024 * 2.6667), SwiGLU
    layer_norm_eps: float = 1e-6
    rope_grid: int = 16  # RoPE positions are rescaled to the pretraining grid
    head_size: int = 768  # the unused projection head

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class CogVLMConfig:
    """The visual-expert LLaMA decoder plus its vision encoder (docs/spec/cogvlm.md section 2).

    The defaults are CogVLM v1's (Vicuna-7B). CogVLM2 (Llama-3-8B) is the same model with
    options: grouped-query attention (`num_key_value_heads`), a bias on the vision expert's
    QKV, a 2x2 conv after the ViT (`vision.downsample`), RoPE base 500000 whose inverse
    frequencies are checkpoint buffers (`rope_freqs_in_weights`), and a second stop id.
    CogVLM2-Video is CogVLM2 at 224 px with two more: no visual expert (`visual_expert`) and
    clips for input (`video`; docs/spec/cogvlm2-video.md section 4).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no GQA)
    vision_qkv_bias: bool = False
    # False: the decoder layers hold only the language weights, and every token (image slot or
    # text) goes through them (CogVLM2-Video, docs/spec/cogvlm2-video.md section 5.4)
    visual_expert: bool = True
    # the input is a clip: each frame through the tower as an image, image_tokens slots per frame
    # (chat: the frame's index as text after it), docs/spec/cogvlm2-video.md section 6
    video: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # CogVLM2: every layer keeps RoPE's inverse frequencies as a checkpoint buffer (bf16 in the
    # published files) that is cast with the model, and angles are computed in that dtype, as
    # the authors' code does; v1 computes them in fp32 from rope_theta
    rope_freqs_in_weights: bool = False
    # text-only conversations get Vicuna's system frame (prompt.build_prompt, the v1 demos);
    # CogVLM2's Llama-3 decoder keeps the template without an image too (docs/spec/cogvlm2.md section 6)
    vicuna_frame: bool = True
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2  # the tokenizer's eos: ends fine-tuning answers, and a stop id
    stop_token_ids: tuple[int, ...] = ()  # further ids that end an answer (CogVLM2: 128009 <|eot_id|>)
    pad_token_id: int = 0  # also the placeholder id of image slots
    template: str = "chat"
    vision: VisionConfig = field(default_factory=VisionConfig)
    # CogAgent: a high-resolution tower feeding a cross-attention block in every decoder layer
    cross_vision: CrossVisionConfig | None = None
    cross_compute_hidden_size: int = 1024  # inner width of that cross-attention (heads x 32)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_heads)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check_numbers(self)
        if self.template not in TEMPLATES:
            raise ConfigError(f"unknown template {self.template!r}; expected one of {TEMPLATES}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be a multiple of num_heads")
        if self.num_key_value_heads < 1 or self.num_heads % self.num_key_value_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                              f"({self.num_key_value_heads})")
        grid = self.vision.image_size // self.vision.patch_size
        if self.vision.downsample < 1 or grid % self.vision.downsample:
            raise ConfigError(f"the {grid}x{grid} patch grid does not divide into "
                              f"{self.vision.downsample}x{self.vision.downsample} blocks")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ConfigError("vision hidden_size must be a multiple of vision num_heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError("vision image_size must be a multiple of patch_size")
        if self.video and (self.visual_expert or self.cross_vision is not None):
            raise ConfigError("a video model has no visual expert and no cross-attention tower "
                              "(its frame runs are not one column range in a batch)")
        if self.template == "inst" and self.cross_vision is None:
            raise ConfigError("the inst template is CogAgent's; this config has no cross_vision")
        cv = self.cross_vision
        if cv is not None:
            if self.cross_compute_hidden_size % self.num_heads:
                raise ConfigError("cross_compute_hidden_size must be a multiple of num_attention_heads")
            if cv.hidden_size % cv.num_heads or (cv.hidden_size // cv.num_heads) % 4:
                raise ConfigError("cross vision head width must be a multiple of 4 (2-D RoPE)")
            if cv.image_size % cv.patch_size:
                raise ConfigError("cross_image_size must be a multiple of its patch size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_size(self) -> int:
        """Width of an expert's fused QKV output: q for every head, k and v for every KV head."""
        return (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id, *self.stop_token_ids)

    @property
    def image_tokens(self) -> int:
        """Sequence slots one image takes: boi + patch vectors + eoi."""
        return self.vision.num_tokens + 2

    @property
    def cross_head_dim(self) -> int:
        return self.cross_compute_hidden_size // self.num_heads

    # ---- Hugging Face config.json -------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        v = self.vision
        d = {
            "architectures": [_architecture(self)],
            "model_type": "cogagent" if self.cross_vision else "cogvlm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_multi_query_heads": self.num_key_value_heads,  # the authors' name for it
            "vision_qkv_bias": self.vision_qkv_bias,
            "visual_expert": self.visual_expert,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_freqs_in_weights": self.rope_freqs_in_weights,
            "vicuna_frame": self.vicuna_frame,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.stop_ids) if self.stop_token_ids else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "template_version": _template_version(self.template, self.cross_vision is not None),
            "torch_dtype": "bfloat16",
            "vision_config": {
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "in_channels": v.in_channels,
                "hidden_size": v.hidden_size,
                "num_hidden_layers": v.num_layers,
                "num_heads": v.num_heads,
                "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.layer_norm_eps,
                "num_positions": v.num_positions,
                "downsample": v.downsample,
                "hidden_act": "gelu",
                "dropout_prob": 0.0,
            },
        }
        if self.cross_vision is not None:
            d.update(cross_hidden_size=self.cross_vision.hidden_size,
                     cross_compute_hidden_size=self.cross_compute_hidden_size,
                     cross_image_size=self.cross_vision.image_size)
            if self.cross_vision != CrossVisionConfig(image_size=self.cross_vision.image_size):
                d["cross_vision_config"] = self.cross_vision.to_dict()  # ours: only non-published towers
        return d


LLAMA3_VOCAB = 128256  # a config with this vocabulary is a CogVLM2 (Llama-3 decoder)
VIDEO_ARCHITECTURE = "CogVLMVideoForCausalLM"  # CogVLM2-Video (docs/spec/cogvlm2-video.md section 3)


def _architecture(config: CogVLMConfig) -> str:
    if config.video:
        return VIDEO_ARCHITECTURE
    return "CogAgentForCausalLM" if config.cross_vision else "CogVLMForCausalLM"


# config.json keys the published files may leave out, and their values: CogVLM2's come from the
# defaults of the authors' config class and constants hard-coded in their code (cogvlm2.md
# section 2), v1's from docs/spec/cogvlm.md section 2
_HF_DEFAULTS = {
    "v1": {"num_multi_query_heads": None, "vision_qkv_bias": False, "visual_expert": True, "rope_theta": 10000.0,
           "rope_freqs_in_weights": False, "vicuna_frame": True, "max_position_embeddings": 2048, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0, "downsample": 1, "template_version": "chat"},
    "cogvlm2": {"num_multi_query_heads": 8, "vision_qkv_bias": True, "visual_expert": True, "rope_theta": 500000.0,
                "rope_freqs_in_weights": True, "vicuna_frame": False, "max_position_embeddings": 8192,
                "bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": 128002, "downsample": 2,
                "template_version": "chat"},
    # CogVLM2-Video (docs/spec/cogvlm2-video.md section 3): the published files state every key but
    # those the authors hard-code (RoPE base, the merge); the rest are their config class's defaults
    "cogvlm2-video": {"num_multi_query_heads": 8, "vision_qkv_bias": False, "visual_expert": False,
                      "rope_theta": 500000.0, "rope_freqs_in_weights": True, "vicuna_frame": False,
                      "max_position_embeddings": 2048, "bos_token_id": 128000, "eos_token_id": 128001,
                      "pad_token_id": 128002, "downsample": 2, "template_version": "base"},
}


def _family(d: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the family a config.json belongs to: its architecture names CogVLM2-Video,
    its vocabulary Llama-3's (CogVLM2) or not (v1)."""
    if VIDEO_ARCHITECTURE in (d.get("architectures") or ()):
        return _HF_DEFAULTS["cogvlm2-video"]
    return _HF_DEFAULTS["cogvlm2" if int(d["vocab_size"]) == LLAMA3_VOCAB else "v1"]


def from_hf_config(source: str | Path | dict[str, Any]) -> CogVLMConfig:
    """Read a Hugging Face `config.json` (a path or the parsed dict); keys it leaves out get the
    published checkpoints' values for its family (CogVLM2 when the vocabulary is Llama-3's)."""
    d = _read_json(source) if not isinstance(source, dict) else source
    try:
        family = _family(d)

        def get(key: str) -> Any:
            return d.get(key, family[key])

        vd = d["vision_config"]
        vision = VisionConfig(
            image_size=int(vd["image_size"]),
            patch_size=int(vd.get("patch_size", 14)),
            in_channels=int(vd.get("in_channels", 3)),
            hidden_size=int(vd["hidden_size"]),
            num_layers=int(vd["num_hidden_layers"]),
            num_heads=int(vd["num_heads"]),
            intermediate_size=int(vd["intermediate_size"]),
            layer_norm_eps=float(vd.get("layer_norm_eps", 1e-6)),
            downsample=int(vd.get("downsample", family["downsample"])),
        )
        check_numbers(vision, "vision_config.")  # before its patch grid is computed below
        if "num_positions" in vd and int(vd["num_positions"]) != vision.num_positions:
            raise ConfigError(
                f"vision_config.num_positions is {vd['num_positions']} but image_size "
                f"{vision.image_size} / patch {vision.patch_size} needs {vision.num_positions}"
            )
        cross = None
        if "cross_image_size" in d:  # CogAgent
            cross = _cross_vision(d.get("cross_vision_config", {}), int(d["cross_image_size"]),
                                  int(d.get("cross_hidden_size", 1024)))
            if int(d.get("cross_compute_hidden_size", 1024)) != cross.hidden_size:
                raise ConfigError("cross_compute_hidden_size must equal cross_hidden_size (the authors' "
                                  "code reshapes the cross-attention output to cross_hidden_size)")
        eos = get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else None
        if not eos:  # one id, or CogVLM2's list of stop ids (the first is the eos)
            raise ConfigError(f"eos_token_id must be a token id or a non-empty list of them, "
                              f"not {get('eos_token_id')!r}")
        kv_heads = d.get("num_key_value_heads", get("num_multi_query_heads"))
        return CogVLMConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_key_value_heads=None if kv_heads is None else int(kv_heads),
            vision_qkv_bias=bool(get("vision_qkv_bias")),
            visual_expert=bool(get("visual_expert")),
            video=family is _HF_DEFAULTS["cogvlm2-video"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(get("rope_theta")),
            rope_freqs_in_weights=bool(get("rope_freqs_in_weights")),
            vicuna_frame=bool(get("vicuna_frame")),
            max_position_embeddings=int(get("max_position_embeddings")),
            bos_token_id=int(get("bos_token_id")),
            eos_token_id=int(eos[0]),
            stop_token_ids=tuple(int(i) for i in eos[1:]),
            pad_token_id=int(get("pad_token_id")),
            template=_template_name(get("template_version"), cross is not None),
            vision=vision,
            cross_vision=cross,
            cross_compute_hidden_size=int(d.get("cross_compute_hidden_size", 1024)),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the key {e.args[0]!r}; is this a CogVLM config?") from None
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # OverflowError: int(Infinity)
        raise wrong_value(d, e, "config.json") from None


def from_sat_config(source: str | Path | dict[str, Any]) -> CogVLMConfig:
    """Read a SwissArmyTransformer `model_config.json` (a path or the parsed dict)."""
    d = _read_json(source) if not isinstance(source, dict) else source
    try:
        ev = d["eva_args"]
        size = ev["image_size"]
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        patch = int(ev.get("patch_size", 14))
        hidden = int(ev["hidden_size"])
        vision = VisionConfig(
            image_size=size,
            patch_size=patch,
            in_channels=int(ev.get("in_channels", 3)),
            hidden_size=hidden,
            num_layers=int(ev["num_layers"]),
            num_heads=int(ev["num_attention_heads"]),
            intermediate_size=int(ev.get("inner_hidden_size") or 4 * hidden),
            layer_norm_eps=float(ev.get("layernorm_epsilon", 1e-6)),
        )
        check_numbers(vision, "eva_args.")  # before its patch grid is computed below
        if "image_length" in d and int(d["image_length"]) != vision.num_patches:
            raise ConfigError(
                f"image_length is {d['image_length']} but image_size {size} / patch {patch} "
                f"gives {vision.num_patches} patches"
            )
        lm_hidden = int(d["hidden_size"])
        cross, cross_compute = None, 1024
        if "cross_image_pix" in d:  # CogAgentModel
            cross = _cross_vision(d.get("cross_vision_config", {}), int(d["cross_image_pix"]),
                                  int(d.get("cross_attn_hidden_size", 1024)))
            cross_compute = int(d.get("cross_hidden_size_per_attention_head", 32)) * int(d["num_attention_heads"])
        return CogVLMConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=lm_hidden,
            intermediate_size=int(d.get("inner_hidden_size") or 4 * lm_hidden),
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_attention_heads"]),
            rms_norm_eps=float(d.get("layernorm_epsilon", 1e-5)),
            max_position_embeddings=int(d.get("max_sequence_length", 2048)),
            template=_template_name(d.get("text_processor_version", "chat"), cross is not None),
            vision=vision,
            cross_vision=cross,
            cross_compute_hidden_size=cross_compute,
        )
    except KeyError as e:
        raise ConfigError(
            f"model_config.json lacks the key {e.args[0]!r}; is this a SAT CogVLM config?"
        ) from None
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # OverflowError: int(Infinity)
        raise wrong_value(d, e, "model_config.json") from None


# ---- checking values: a config file is user input ------------------------------------------

# int fields: in [1, 2**20] unless named here (token ids from 0): far past any real model, short
# of sizes that would build for hours or overflow a tensor's shape
MINIMUM = {"max_position_embeddings": 2}
MAXIMUM = {"num_layers": 1024, "max_position_embeddings": 2**24}


def check_numbers(config: Any, where: str = "") -> None:
    """Every int field an int in range, every float finite and > 0, in nested configs too: so a
    bad config.json fails here, in one line, and not as a tensor shape error while loading."""
    for f in fields(config):
        value, name = getattr(config, f.name), where + f.name
        if is_dataclass(value):
            check_numbers(value, f"{name}.")
        elif isinstance(f.default, bool) or isinstance(value, (str, type(None))):
            continue
        elif isinstance(f.default, int):
            low = 0 if f.name.endswith("_token_id") else MINIMUM.get(f.name, 1)
            high = MAXIMUM.get(f.name, 2**20)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"model config: {name} must be an integer in [{low}, {high}], not {str(value)[:40]}")
        elif isinstance(f.default, float):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"model config: {name} must be a finite number > 0, not {value!r}")
    vocab = getattr(config, "vocab_size", None)
    for f in fields(config):
        if f.name.endswith("_token_id") and getattr(config, f.name) >= vocab:
            raise ConfigError(f"model config: {where}{f.name} is {getattr(config, f.name)}, past vocab_size {vocab}")


def wrong_value(d: Any, error: Exception, file: str) -> ConfigError:
    """A ConfigError for a value int()/float() or a nested lookup could not take, naming it."""
    if not isinstance(d, dict):
        return ConfigError(f"{file} must hold a JSON object, not {type(d).__name__}")
    for key, value in d.items():
        if key.endswith(("_config", "_args")) and not isinstance(value, dict):
            return ConfigError(f"{file}: {key} must be an object, not {json.dumps(value)[:40]}")
    for scope, values in [("", d)] + [(f"{k}.", v) for k, v in d.items() if isinstance(v, dict)]:
        for key, value in values.items():
            if (value is None or (isinstance(value, float) and not math.isfinite(value))
                    or (isinstance(value, str) and str(error).endswith(repr(value)))):
                return ConfigError(f"{file}: {scope}{key} has the wrong value {json.dumps(value)[:40]}")
    return ConfigError(f"{file} has a value of the wrong type: {error}")


def _template_name(version: str, cogagent: bool = False) -> str:
    """Our template for the authors' `template_version`: they call the v1.1 chat template
    `chat_old`, and CogAgent's `chat` is the ` [INST] ... [/INST] ` one (docs/spec/cogagent.md section 11)."""
    version = {**TEMPLATE_ALIASES, **({"chat": "inst"} if cogagent else {})}.get(version, version)
    if version not in TEMPLATES or (version == "inst" and not cogagent):
        raise ConfigError(f"unknown template version {version!r}; expected one of {TEMPLATES}")
    return version


def _template_version(template: str, cogagent: bool) -> str:
    """The inverse of `_template_name`."""
    if cogagent:
        return {"chat": "chat_old", "inst": "chat"}.get(template, template)
    return template


def _cross_vision(overrides: dict[str, Any], image_size: int, hidden_size: int) -> CrossVisionConfig:
    """The published tower at `image_size` (its shape is hard-coded in the authors' code); a
    `cross_vision_config` dict, which only our own small test models write, overrides it."""
    known = set(CrossVisionConfig.__dataclass_fields__)
    if set(overrides) - known:
        raise ConfigError(f"unknown cross_vision_config keys {sorted(set(overrides) - known)}")
    args = {"hidden_size": hidden_size, **overrides, "image_size": image_size}
    if args["hidden_size"] != hidden_size:
        raise ConfigError(f"cross_hidden_size {hidden_size} differs from the tower width {args['hidden_size']}")
    return CrossVisionConfig(**args)


def _read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# ---- registry ---------------------------------------------------------------------------

SHIPPED_DIR = Path(__file__).parent / "weights"  # models that install with the package


@dataclass(frozen=True)
class ModelEntry:
    name: str
    hf_repo: str | None  # published on the Hugging Face hub; None: shipped in SHIPPED_DIR
    config: CogVLMConfig | None  # None: read from the shipped config.json
    use: str
    aliases: tuple[str, ...] = ()  # other names the authors' README and demos load it by

    @property
    def local_dir(self) -> Path | None:
        return None if self.hf_repo else SHIPPED_DIR / self.name

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that means this model: ours, the aliases, the hub id with and without its owner."""
        hub = (self.hf_repo, self.hf_repo.split("/")[-1]) if self.hf_repo else ()
        return (self.name, *self.aliases, *hub)


def _published(image_size: int, template: str) -> CogVLMConfig:
    return CogVLMConfig(template=template, vision=VisionConfig(image_size=image_size))


def _cogagent(template: str) -> CogVLMConfig:
    """CogAgent-18B: CogVLM at 224 px plus the 1120 px cross-attention branch (docs/spec/cogagent.md section 3)."""
    return CogVLMConfig(template=template, vision=VisionConfig(image_size=224), cross_vision=CrossVisionConfig())


# CogVLM2-19B (docs/spec/cogvlm2.md section 2): the chat and Chinese models (and their int4 copies) share it
COGVLM2 = CogVLMConfig(
    vocab_size=LLAMA3_VOCAB, intermediate_size=14336, num_key_value_heads=8, vision_qkv_bias=True,
    rope_theta=500000.0, rope_freqs_in_weights=True, vicuna_frame=False, max_position_embeddings=8192,
    bos_token_id=128000,
    eos_token_id=128001, stop_token_ids=(128009,), pad_token_id=128002, template="chat",
    vision=VisionConfig(image_size=1344, downsample=2))


# CogVLM2-Video (docs/spec/cogvlm2-video.md section 3): CogVLM2's decoder and tower at 224 px per
# frame (257 ViT positions, 64 + 2 slots a frame), no visual expert, 2K positions, one stop id.
# The published config.json says template "base" for all three models; the registry gives each
# the template its authors' demo passes (section 1)
COGVLM2_VIDEO = CogVLMConfig(
    vocab_size=LLAMA3_VOCAB, intermediate_size=14336, num_key_value_heads=8, visual_expert=False, video=True,
    rope_theta=500000.0, rope_freqs_in_weights=True, vicuna_frame=False, max_position_embeddings=2048,
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128002, template="base",
    vision=VisionConfig(image_size=224, downsample=2))


def _video(template: str) -> CogVLMConfig:
    return replace(COGVLM2_VIDEO, template=template)


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        # the authors' README loads v1.1 as `cogvlm-chat` since they replaced v1.0 with it (2023/11/20)
        ModelEntry("cogvlm-chat-v1.1", "THUDM/cogvlm-chat-hf", _published(490, "chat"),
                   "multi-turn chat, VQA", aliases=("cogvlm-chat",)),
        ModelEntry("cogvlm-base-224", "THUDM/cogvlm-base-224-hf", _published(224, "base"),
                   "captioning after pretraining"),
        ModelEntry("cogvlm-base-490", "THUDM/cogvlm-base-490-hf", _published(490, "base"),
                   "captioning after pretraining, 490 px"),
        ModelEntry("cogvlm-grounding-generalist", "THUDM/cogvlm-grounding-generalist-hf",
                   _published(490, "base"), "REC, grounded captioning, box-to-caption",
                   aliases=("cogvlm-grounding-generalist-v1.1",)),
        ModelEntry("cogvlm-grounding-base", "THUDM/cogvlm-grounding-base-hf",
                   _published(490, "base"), "grounding, base"),
        ModelEntry("cogagent-chat", "THUDM/cogagent-chat-hf", _cogagent("inst"),
                   "GUI agent, multi-turn chat, grounding (1120 px screenshots)"),
        ModelEntry("cogagent-vqa", "THUDM/cogagent-vqa-hf", _cogagent("chat"),
                   "single-turn VQA benchmarks (1120 px)"),
        ModelEntry("cogvlm2-llama3-chat-19B", "THUDM/cogvlm2-llama3-chat-19B", COGVLM2,
                   "CogVLM2, English: image understanding and multi-turn dialogue, 8K context"),
        ModelEntry("cogvlm2-llama3-chinese-chat-19B", "THUDM/cogvlm2-llama3-chinese-chat-19B", COGVLM2,
                   "CogVLM2, Chinese and English"),
        ModelEntry("cogvlm2-llama3-chat-19B-int4", "THUDM/cogvlm2-llama3-chat-19B-int4", COGVLM2,
                   "bitsandbytes fp4 copy of cogvlm2-llama3-chat-19B (unpacked on load)"),
        ModelEntry("cogvlm2-llama3-chinese-chat-19B-int4", "THUDM/cogvlm2-llama3-chinese-chat-19B-int4", COGVLM2,
                   "bitsandbytes fp4 copy of cogvlm2-llama3-chinese-chat-19B (unpacked on load)"),
        ModelEntry("cogvlm2-video-llama3-chat", "THUDM/cogvlm2-video-llama3-chat", _video("chat"),
                   "CogVLM2-Video: video question answering (1 frame a second, up to 24), 2K context"),
        ModelEntry("cogvlm2-video-llama3-base", "THUDM/cogvlm2-video-llama3-base", _video("base"),
                   "CogVLM2-Video base: video captioning (24 frames over the first 60 s)"),
        ModelEntry("cogvlm2-llama3-caption", "THUDM/cogvlm2-llama3-caption", _video("chat"),
                   "CogVideoX's video captioner (CogVLM2-Video weights): detailed clip captions"),
        ModelEntry("cogvlm-tiny", None, None,
                   "9 M-parameter CogVLM trained on synthetic shapes; ships with the package (the default)"),
    )
}


def registry_entry(name: str) -> ModelEntry | None:
    """The registry model `name` means (ours, an alias, or its hub id with or without THUDM/)."""
    return next((e for e in REGISTRY.values() if name in e.names), None)
