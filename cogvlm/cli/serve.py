"""`cogvlm serve`: the command-line half of the OpenAI-compatible server (cogvlm/server.py holds
the app): flags, their safe defaults, loading, and running uvicorn."""

import argparse
import os
import sys
from typing import Any, MutableMapping

from ..errors import UsageError
from ..server import VIDEO_LIMITS, ServeOptions, create_app, is_loopback, loopback_hosts, server_settings
from ..video import VideoLimits, pyav
from .flags import (add_model_flags, listen_socket, load_model, load_options, port, positive_float, positive_int,
                    sampling_flags)


def add_video_limit_flags(p: argparse.ArgumentParser) -> None:
    """The limits on one clip from a client (`cogvlm serve` and `cogvlm web`); `video_limits` reads them."""
    p.add_argument("--max-video-bytes", type=positive_int, default=VIDEO_LIMITS.max_bytes, metavar="N",
                   help=f"largest video file (default {VIDEO_LIMITS.max_bytes})")
    p.add_argument("--max-video-seconds", type=positive_float, default=VIDEO_LIMITS.max_seconds, metavar="S",
                   help="longest video; all its frames are indexed to sample it "
                        f"(default {VIDEO_LIMITS.max_seconds:g})")
    p.add_argument("--max-video-frames", type=positive_int, default=VIDEO_LIMITS.max_frames, metavar="N",
                   help=f"most frames in a video (default {VIDEO_LIMITS.max_frames})")
    p.add_argument("--max-video-pixels", type=positive_int, default=VIDEO_LIMITS.max_pixels, metavar="N",
                   help=f"largest video frame, width x height (default {VIDEO_LIMITS.max_pixels})")


def video_limits(args: argparse.Namespace) -> VideoLimits:
    return VideoLimits(args.max_video_bytes, args.max_video_seconds, args.max_video_frames, args.max_video_pixels)


def add_serve_verb(verbs: Any) -> None:
    """Register `cogvlm serve` on the top-level parser's subcommands."""
    p = verbs.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (pip install 'cogvlm[serve]')",
                         description="OpenAI-compatible chat completions (streaming included) for one model; "
                                     "concurrent requests are decoded together in one batch. The sampling flags "
                                     "set the defaults for requests that do not choose. See docs/serve.md.")
    add_model_flags(p)
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("COGVLM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $COGVLM_API_KEY; unset: no auth; "
                        "an empty key is refused)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="most requests decoded together (default 16)")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="let requests name http(s) URLs of images and videos")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let requests name image and video files on this machine")
    p.add_argument("--max-image-bytes", type=positive_int, default=ServeOptions.max_image_bytes, metavar="N",
                   help=f"largest image file (default {ServeOptions.max_image_bytes})")
    p.add_argument("--max-image-pixels", type=positive_int, default=ServeOptions.max_image_pixels, metavar="N",
                   help=f"largest image, width x height (default {ServeOptions.max_image_pixels})")
    p.add_argument("--max-image-memory", type=positive_int, default=ServeOptions.max_image_memory, metavar="N",
                   help="bytes that images being decoded may take together, all requests at once; more wait "
                        f"(default {ServeOptions.max_image_memory})")
    add_video_limit_flags(p)
    p.add_argument("--max-video-memory", type=positive_int, default=ServeOptions.max_video_memory, metavar="N",
                   help="bytes that the sampled frames of videos being decoded may take together, all requests at "
                        f"once; more wait (default {ServeOptions.max_video_memory})")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma list of names the Host header may carry, or '*' (default: 127.0.0.1,localhost,[::1] "
                        "on a loopback --host, else '*')")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                   help="serve /docs, /redoc and /openapi.json, without the key (default: only on a loopback "
                        "--host without --api-key)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """The flags as ServeOptions, with the safe defaults that depend on --host and --api-key."""
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("the API key is empty (--api-key or $COGVLM_API_KEY): set a real key, or unset "
                         "COGVLM_API_KEY to serve without one")
    loopback = is_loopback(args.host)
    if args.allowed_hosts is None:
        hosts = loopback_hosts(args.host) if loopback else ("*",)
    else:
        hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
        if not hosts:
            raise UsageError("--allowed-hosts is empty; give names (e.g. myhost.example,127.0.0.1) or '*'")
    docs = loopback and args.api_key is None if args.docs is None else args.docs
    return ServeOptions(args.served_model_name or args.model, args.api_key, args.allow_remote_images,
                        args.allow_local_files, args.max_image_bytes, args.max_image_pixels, args.max_image_memory,
                        video_limits(args), args.max_video_memory, args.template, hosts, docs)


ALLOC_CONF = "expandable_segments:True"


def use_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Let PyTorch's CUDA allocator grow segments in place instead of caching fixed ones: a server's
    prefills come in every length, and fixed segments left by one length go unused by the next
    (fragmentation: out of memory with gigabytes reserved but free). Read once, when CUDA first
    allocates, so this runs before the load; the ranks that `--tp` starts inherit it. A setting
    of the user's (either name: PYTORCH_ALLOC_CONF is PyTorch 2.9's) is left alone. True if set."""
    if "PYTORCH_CUDA_ALLOC_CONF" in environ or "PYTORCH_ALLOC_CONF" in environ:
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    use_expandable_segments()
    try:
        import fastapi  # noqa: F401  (create_app needs it: fail now, not after loading the model)
        import uvicorn
    except ImportError:
        raise UsageError("the server needs FastAPI and uvicorn: pip install 'cogvlm[serve]'") from None
    sampling, options = sampling_flags(args), load_options(args)
    opts = serve_options(args)
    sock = listen_socket(args.host, args.port)
    try:
        vlm = load_model(options, sampling)
    except BaseException:
        sock.close()
        raise
    if vlm.config.video:
        pyav()  # a video model's requests need PyAV: say so now, not at the first request
    if not is_loopback(args.host) and opts.api_key is None:
        print(f"cogvlm serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              f"can use it", file=sys.stderr)
    def stop() -> None:  # the model stopped for good: finish answering (503), then exit
        server.should_exit = True

    app = create_app(vlm, opts, args.max_batch, on_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           **server_settings()))
    server.run(sockets=[sock])
    if app.state.scheduler.failure is not None:
        raise app.state.scheduler.failure  # one line, exit 2 (cogvlm.cli.main)
    return 0
