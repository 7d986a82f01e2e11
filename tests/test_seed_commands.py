"""The checkpoint names of the authors' README and demos, and the seed README's commands
translated to `cogvlm chat` / `cogvlm web`, up to the point where the download would start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cogvlm.config import registry_entry

# every name the authors load a published CogVLM by -> the Hugging Face repo that holds it
# (cogvlm-chat: v1.0 was replaced by v1.1 under that name on 2023/11/20; the grounding
# generalist likewise became v1.1 on 2023/12/8)
AUTHORS_NAMES = {
    "cogvlm-chat": "THUDM/cogvlm-chat-hf",
    "cogvlm-chat-v1.1": "THUDM/cogvlm-chat-hf",
    "cogvlm-base-224": "THUDM/cogvlm-base-224-hf",
    "cogvlm-base-490": "THUDM/cogvlm-base-490-hf",
    "cogvlm-grounding-generalist": "THUDM/cogvlm-grounding-generalist-hf",
    "cogvlm-grounding-generalist-v1.1": "THUDM/cogvlm-grounding-generalist-hf",
    "cogvlm-grounding-base": "THUDM/cogvlm-grounding-base-hf",
}
HUB_IDS = sorted(set(AUTHORS_NAMES.values()))


@pytest.mark.parametrize("name, repo", [*AUTHORS_NAMES.items(), *((r, r) for r in HUB_IDS),
                                        *((r.removeprefix("THUDM/"), r) for r in HUB_IDS)])
def test_every_name_the_authors_use_is_a_registry_model(name, repo):
    entry = registry_entry(name)
    assert entry is not None and entry.hf_repo == repo


def test_unknown_names_stay_unknown():
    assert registry_entry("cogvlm-chat-v2") is None and registry_entry("THUDM/cogvlm-chat") is None


# The seed README's commands (python cli_demo.py / web_demo.py ...), translated
SEED_COMMANDS = [
    "web --from_pretrained cogvlm-chat --version chat --english --bf16",
    "web --from_pretrained cogvlm-grounding-generalist --version base --english --bf16",
    "chat --from_pretrained cogvlm-base-224 --version base --english --bf16 --no_prompt",
    "chat --from_pretrained cogvlm-base-490 --version base --english --bf16 --no_prompt",
    "chat --from_pretrained cogvlm-chat --version chat --english --bf16",
    "chat --from_pretrained cogvlm-grounding-base --version base --english --bf16",
    "chat --from_pretrained cogvlm-grounding-generalist --version base --english --bf16",
    # the authors' later README: SAT's name for the v1.1 template, and the hub ids of their HF demo
    "chat --from_pretrained cogvlm-chat --version chat_old --bf16",
    "chat --from_pretrained THUDM/cogvlm-chat-hf --bf16",
    "chat --from_pretrained cogvlm-grounding-generalist-hf --bf16",
]

# one interpreter for all commands: each goes through the real entry point, in a process whose
# environment is offline with an empty Hugging Face cache
RUNNER = """
import contextlib, io, json, sys
from cogvlm.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_seed_readme_commands_get_as_far_as_the_download(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_CACHE", None)
    argvs = [cmd.split() for cmd in SEED_COMMANDS]
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for cmd, (code, err) in zip(SEED_COMMANDS, results):
        assert code == 2, (cmd, err)
        assert "HF_HUB_OFFLINE" in err and "unknown model" not in err and "Traceback" not in err, (cmd, err)
