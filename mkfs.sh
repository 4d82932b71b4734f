#!/usr/bin/env bash
# mkfs.sh: set up agentfs on a Debian machine, make a demo store with one agent, mount it.
# See mkfs(8): man -l man/man8/mkfs.8
set -euo pipefail

usage() {
	cat <<'EOF'
usage: ./mkfs.sh [--store STORE] [--mountpoint DIR] NAME
       ./mkfs.sh --deps-only

Installs what agentfs needs (Debian packages, a venv with the package), creates
the store STORE (default ./NAME.store) with an example agent named `echo`, and
mounts it at DIR (default ./NAME), where it stays mounted.

  --store STORE       the store directory (default ./NAME.store)
  --mountpoint DIR    where to mount it (default ./NAME)
  --deps-only         install the packages and the venv only, then stop
  -h, --help          this text

Environment: AGENTFS_VENV (default: .venv beside mkfs.sh), PYTHON (default python3).
Running it again is safe: what exists already is kept.
EOF
}

die() {
	printf 'mkfs.sh: %s\n' "$*" >&2
	exit 1
}

usage_error() {
	printf 'mkfs.sh: %s (try --help)\n' "$*" >&2
	exit 2
}

say() {
	printf 'mkfs.sh: %s\n' "$*"
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${AGENTFS_VENV:-$root/.venv}
python=${PYTHON:-python3}
# Why each is here: mkfs(8). busybox: the tests run timer.sh under its sh; bubblewrap: the
# tick sandbox (bwrap, once per mount); tmux: the tests run `agentfs top` in a real terminal;
# systemd: the tests check the units with systemd-analyze.
debs=(fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev jq curl bindfs busybox bubblewrap
	tmux systemd)
# The example agent: counts the triggers it answers in state/count and answers each with one
# line; it lets its lifecycle triggers (create, wake, sleep...) pass.
# shellcheck disable=SC2016 # expanded by the agent's /bin/sh, not here
echo_script='read -r msg; case $msg in *lifecycle\":true*) exit 0;; esac; n=$(cat "$AGENT_DIR/state/count" 2>/dev/null || echo 0); echo $((n+1)) > "$AGENT_DIR/state/count"; echo "got: $msg"'
echo_program="/bin/sh -c '$echo_script'"

name='' store='' mountpoint='' deps_only=''
while [ $# -gt 0 ]; do
	case $1 in
	-h | --help) usage; exit 0 ;;
	--deps-only) deps_only=1 ;;
	--store) [ $# -ge 2 ] || usage_error "--store needs a directory"; store=$2; shift ;;
	--store=*) store=${1#*=} ;;
	--mountpoint) [ $# -ge 2 ] || usage_error "--mountpoint needs a directory"; mountpoint=$2; shift ;;
	--mountpoint=*) mountpoint=${1#*=} ;;
	-*) usage_error "unknown option $1" ;;
	*) [ -z "$name" ] || usage_error "one NAME only"; name=$1 ;;
	esac
	shift
done
if [ -z "$deps_only" ]; then
	[ -n "$name" ] || { usage >&2; exit 2; }
	case $name in
	*/*) usage_error "NAME '$name' must not contain '/'" ;;
	.* | -*) usage_error "NAME '$name' must not start with '.' or '-'" ;;
	esac
fi

# as_root CMD...: run CMD as root, through sudo when we are not root.
as_root() {
	if [ "$(id -u)" -eq 0 ]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo "$@"
	else
		die "need root to run '$*': run mkfs.sh as root, or install sudo"
	fi
}

install_debs() {
	local missing=() p
	command -v dpkg-query >/dev/null || die "dpkg-query not found: mkfs.sh installs with apt, on Debian"
	for p in "${debs[@]}"; do
		if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$p")
		fi
	done
	if [ ${#missing[@]} -eq 0 ]; then
		say "Debian packages: all present"
		return
	fi
	say "Debian packages: installing ${missing[*]}"
	as_root apt-get update -q || die "apt-get update failed"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
		die "apt-get install ${missing[*]} failed"
}

install_venv() {
	local stamp want
	command -v "$python" >/dev/null || die "$python not found (set PYTHON to a Python 3.11 or newer)"
	"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
		die "$python is $("$python" -V 2>&1); agentfs needs Python 3.11 or newer (set PYTHON)"
	if [ ! -x "$venv/bin/python" ]; then
		say "venv: creating $venv"
		"$python" -m venv "$venv" || die "could not create the venv $venv"
	fi
	venv=$(cd "$venv" && pwd)
	# Reinstall only when pyproject.toml, the C extension or the checkout's place changed since
	# the last install (an editable install builds agentfs/_spawn.c in place).
	stamp=$venv/.agentfs-installed
	want="$root $(cat "$root/pyproject.toml" "$root/agentfs/_spawn.c" | sha256sum | cut -d' ' -f1)"
	if [ -x "$venv/bin/agentfs" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
		say "venv: agentfs already installed in $venv"
	else
		say "venv: pip install -e '.[test]' into $venv"
		"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${root}[test]" ||
			die "pip install into $venv failed"
		printf '%s\n' "$want" >"$stamp"
	fi
}

# mount -t fuse.agentfs runs /sbin/mount.fuse3, which finds `agentfs` in /usr/local/bin (mount(8)
# gives it no PATH); the systemd units (agentfs(8)) find the drivers there too.
link_commands() {
	local name link
	for name in agentfs agentfs-timer agentfs-http agentfs-nostr; do
		link=/usr/local/bin/$name
		if [ "$(readlink "$link" 2>/dev/null)" = "$venv/bin/$name" ]; then
			continue
		fi
		if [ -e "$link" ] && [ ! -L "$link" ]; then
			say "note: $link exists and is not a link; left alone"
		elif [ -w /usr/local/bin ]; then
			ln -sfn "$venv/bin/$name" "$link"
			say "linked $link -> $venv/bin/$name (for mount -t fuse.agentfs and the systemd units)"
		else
			say "note: /usr/local/bin is not writable; for mount -t fuse.agentfs and the units run:"
			say "      sudo ln -s '$venv/bin/$name' $link"
		fi
	done
}

# fuse_mount_state DIR: prints none, live or stale for a FUSE mount at DIR.
fuse_mount_state() {
	local mnt fstype rest
	while read -r _ mnt fstype rest; do
		case $fstype in fuse | fuse.*) ;; *) continue ;; esac
		[ "$mnt" = "$1" ] || continue
		# Listing asks the daemon itself; stat may be answered from the kernel's cache.
		if ls -A "$1" >/dev/null 2>&1; then echo live; else echo stale; fi
		return
	done </proc/self/mounts
	echo none
}

install_debs
install_venv
link_commands
if [ -n "$deps_only" ]; then
	say "dependencies installed (--deps-only)"
	exit 0
fi

[ -e /dev/fuse ] || die "/dev/fuse is missing: this machine cannot mount FUSE file systems (try: modprobe fuse)"
agentfs=$venv/bin/agentfs
store=${store:-$PWD/$name.store}
mountpoint=${mountpoint:-$PWD/$name}
mkdir -p "$(dirname "$store")" "$(dirname "$mountpoint")"
store=$(cd "$(dirname "$store")" && pwd)/$(basename "$store")
mountpoint=$(cd "$(dirname "$mountpoint")" && pwd)/$(basename "$mountpoint")
mnemonic=$store.mnemonic

# The store: made once, kept after.
if [ -d "$store" ] && [ -n "$(ls -A "$store")" ]; then
	say "store: $store exists; kept"
else
	[ ! -e "$mnemonic" ] ||
		die "$mnemonic exists but the store $store does not; move that file away first (it may hold the only copy of an old store's keys)"
	say "store: creating $store"
	if ! (umask 077 && "$agentfs" init "$store" >"$mnemonic"); then
		rm -f "$mnemonic"
		die "agentfs init $store failed"
	fi
	chmod 600 "$mnemonic"
	cat <<EOF

  !!! DEMO ONLY: the store's 24-word mnemonic is saved in
  !!!   $mnemonic  (mode 0600)
  !!! Whoever reads that file holds every key of this store, the user's
  !!! and all the agents'. For real use, write the words down somewhere
  !!! safe and delete the file.

EOF
fi

# The mount: left running.
state=$(fuse_mount_state "$mountpoint")
if [ "$state" = stale ]; then
	say "mount: $mountpoint is a stale mount (its daemon is gone); unmounting it"
	fusermount3 -u -z "$mountpoint" || die "fusermount3 -u -z $mountpoint failed"
	state=none
fi
if [ "$state" = live ]; then
	[ -f "$mountpoint/ctl" ] || die "$mountpoint is already a mount point of another FUSE file system"
	say "mount: $mountpoint is already mounted; kept"
elif mountpoint -q "$mountpoint" 2>/dev/null; then
	die "$mountpoint is already a mount point of something else"
else
	mkdir -p "$mountpoint"
	[ -z "$(ls -A "$mountpoint")" ] || die "$mountpoint is not empty; choose another with --mountpoint"
	say "mount: agentfs mount --store $store $mountpoint"
	"$agentfs" mount --store "$store" "$mountpoint" ||
		die "agentfs mount failed (the daemon's log: $store/daemon.log)"
fi

# The example agent.
if [ -L "$mountpoint/echo" ] || [ -e "$mountpoint/echo" ]; then
	say "agent: echo exists; kept"
else
	say "agent: creating echo"
	printf 'new echo %s\n' "$echo_program" >"$mountpoint/ctl" ||
		die "could not create the agent echo through $mountpoint/ctl (see $store/daemon.log)"
fi
npub=$(readlink "$mountpoint/echo") || die "$mountpoint/echo is not a link to an agent"
say "agent: echo is $npub"

rel=$mountpoint
case $mountpoint in "$PWD"/*) rel=${mountpoint#"$PWD"/} ;; esac
cat <<EOF

agentfs is mounted at $mountpoint (store $store). Try:

  echo hello > $rel/echo/inbox      # one message; it runs one tick
  cat $rel/echo/outbox              # the reply: "got: …"
  cat $rel/echo/state/count         # how many ticks have committed
  cat $rel/echo/ctl $rel/echo/log
  man -l man/man4/agentfs.4
  fusermount3 -u $rel               # unmount; ./mkfs.sh $name mounts it again
EOF
