# Sourced by the device scripts: run the "label:seconds:rys-forge arguments" jobs given as arguments, each
# under its own time limit (a sweep or rank cut by its limit is resumed by the next call with --resume),
# logging each to ~/runs/<label>.log and printing its tail.
mkdir -p ~/runs
for job in "$@"; do
  label=${job%%:*}; rest=${job#*:}; limit=${rest%%:*}; args=${rest#*:}
  echo "=== $label (limit ${limit}s): rys-forge $args"
  start=$(date +%s)
  timeout "$limit" python3 -m rys_forge.cli $args > ~/runs/$label.log 2>&1
  echo "=== $label rc=$? in $(( $(date +%s) - start )) s"; tail -c 2500 ~/runs/$label.log | tr '\r' '\n' | grep -av "^\s*$" | tail -n 25
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
