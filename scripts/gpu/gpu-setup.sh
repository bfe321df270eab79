# Sourced by the results/run-*-gpu.sh scripts on the device machine: assembles the SmolLM2 GGUF (after the
# `run-gpu.sh assets` calls put the first parts in /tmp/kvbench-assets; this call carries .carry/b, the last) and
# installs kvbench. Sets root, gguf, PYTHONPATH and KVBENCH_CACHE.
root=$(pwd)
assets=/tmp/kvbench-assets
gguf=$assets/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  (cd $assets && cp "$root"/.carry/b/* . && cat smollm2.part0* > "$gguf" \
    && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c \
    && python3 -m pip install -q --no-index --no-deps --target /tmp/kvbench-site gguf-*.whl) || exit 1
fi
export PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-} KVBENCH_CACHE=/tmp/kvbcache PYTHONUNBUFFERED=1 CI=1
python3 -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1 | grep -v WARNING
