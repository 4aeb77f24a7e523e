"""Download a Hugging Face model repo's config, tokenizer and safetensors weights.

    python scripts/download.py mistralai/Mistral-7B-Instruct-v0.2 [--out DIR] [--revision REV]

Only what this project loads is fetched (no .bin / .pth / .gguf duplicates). Needs network and,
for gated repos, a token (HF_TOKEN or `hf auth login`). Without network, see prepare_test_model.py.
"""

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.safetensors",
    "*.safetensors.index.json",
]


def download(repo_id, out, revision=None):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=ALLOW_PATTERNS)
    # Order matters: the specific errors subclass HfHubHTTPError.
    except GatedRepoError:
        return f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        return f"{repo_id} does not exist on the hub (or is private and no token grants access)"
    except RevisionNotFoundError:
        return f"{repo_id} has no revision {revision!r}"
    except HFValidationError as e:
        return f"{repo_id!r} is not a valid repo id ({e})"
    except LocalEntryNotFoundError:
        return f"cannot reach the Hugging Face hub to fetch {repo_id} (offline?) and it is not cached"
    except HfHubHTTPError as e:
        return f"the hub refused the download of {repo_id}: {str(e).splitlines()[0]}"
    except OSError as e:  # connection errors that get past the hub's own wrapping
        return f"cannot download {repo_id} (network error: {e})"
    if not glob.glob(os.path.join(out, "*.safetensors")):
        return f"{repo_id} has no *.safetensors weights, which is all this project loads"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo_id", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--out", help="target folder (default: checkpoints/<repo name>)")
    ap.add_argument("--revision", help="branch, tag or commit")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(ROOT, "checkpoints", args.repo_id.rstrip("/").split("/")[-1])
    error = download(args.repo_id, out, args.revision)
    if error:
        print(f"download: error: {error}.", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
