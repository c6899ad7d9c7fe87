# Sourced by the benchmark scripts. A results folder records the settings its runs were made with, so that a re-run
# with other settings never mixes two kinds of runs in one table (finished runs are skipped on re-runs).
#   require_settings <folder> <record file name> <settings>
require_settings() {
  local folder=$1 record=$1/$2 settings=$3
  if [ -f "$record" ] && [ "$(cat "$record")" != "$settings" ]; then
    echo "$folder holds runs made with $(cat "$record"), not $settings: use another output folder." >&2
    exit 2
  fi
  mkdir -p "$folder" && echo "$settings" > "$record"
}
