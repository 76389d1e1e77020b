# service_predates_config UNIT: succeeds when the systemd UNIT runs but started before its unit file, a
# drop-in, or an environment file it reads was last written: the running service does not have the
# configuration on disk, and a restart is owed. Times in microseconds: the unit's
# ExecMainStartTimestamp against each file's mtime (Ansible's template and copy write a file only when
# its content changes). The files are the ones systemd names for the unit, so the check needs nothing
# but the unit's name. Used by roles/app (switch-read.yml, restart.yml) and by `invoke status`
# (opsbook/engines/fleet.py), which both read this file.
service_predates_config() {
  local unit=$1 started changed f
  [ "$(systemctl show -p ActiveState --value "$unit")" = active ] || return 1
  started=$(systemctl show -p ExecMainStartTimestamp --timestamp=us+utc --value "$unit")
  [ -n "$started" ] || return 1
  started=$(date -d "$started" +%s%6N) || return 1
  while IFS= read -r f; do
    [ -n "$f" ] || continue
    changed=$(stat -c %.6Y "$f" 2>/dev/null) || continue
    [ "${changed/./}" -gt "$started" ] && return 0
  done < <(systemctl show -p FragmentPath --value "$unit"
           systemctl show -p DropInPaths --value "$unit" | tr ' ' '\n'
           systemctl show -p EnvironmentFiles --value "$unit" | sed 's/ (ignore_errors=[a-z]*)$//')
  return 1
}
