#!/bin/sh
# timer.sh: agentfs-timer in POSIX sh, for devices without Python (see agentfs-timer(8)).
# Reads MOUNTPOINT/alarms and writes each due alarm into its agent's inbox.  Needs only
# POSIX tools and `date +%s`, so it sees whole seconds: an alarm fires in the second after
# its due time, never before it.

usage() {
    echo 'usage: timer.sh [--poll SECONDS] [--once] MOUNTPOINT' >&2
    exit 2
}

log() {
    printf 'timer: %s\n' "$*" >&2
}

poll=1
once=
while [ $# -gt 0 ]; do
    case $1 in
    --poll) [ $# -ge 2 ] || usage; poll=$2; shift 2 ;;
    --poll=*) poll=${1#--poll=}; shift ;;
    --once) once=1; shift ;;
    --) shift; break ;;
    -?*) usage ;;
    *) break ;;
    esac
done
[ $# -eq 1 ] || usage
case $poll in
'' | *[!0-9]* | 0*) log "--poll $poll: want a whole number of seconds from 1"; exit 2 ;;
esac
mnt=$1
# The utilities' error messages in English: fire() tells errors apart by their words.
LC_ALL=C
export LC_ALL
if [ ! -f "$mnt/alarms" ]; then
    log "$mnt is not an agentfs mount (it has no alarms file)"
    exit 1
fi

nl='
'
stop=
trap 'stop=SIGTERM' TERM
trap 'stop=SIGINT' INT

# "NPUB ID" lines, each ending in a newline: alarms written (or given up on) and still
# listed.  The daemon removes an alarm when it takes the write; until this reader sees
# that, the alarm must not fire again.
fired=
bad=           # lines of the file that are not alarms, logged once
read_error=    # why the file cannot be read, logged once
now=0

# fire NPUB ID MS: one open, write and close of the inbox.  Returns 0 when done with the
# alarm (fired, or failed for good), 1 when the next round should try again.
fire() {
    if [ ! -d "$mnt/$1" ]; then
        if [ ! -f "$mnt/alarms" ]; then
            # Not the agent gone but the whole mount (the daemon stopped, its mount point
            # left empty): the next round tries again.
            log "$2 for $1: No such file or directory; will retry"
            return 1
        fi
        log "$2 for $1: agent gone (No such file or directory); skipped"
        return 0
    fi
    # env: the utility, not the shell's builtin, so a failed write says why (dash says
    # only "I/O error").  2>&1 comes first: the shell's own open error is captured too.
    if error=$(env printf '{"type":"alarm","id":"%s"}\n' "$2" 2>&1 >>"$mnt/$1/inbox"); then
        now=$(date +%s)
        log "fired $2 for $1 (late $((now * 1000 - $3)) ms)"
        return 0
    fi
    case $error in
    *'No such file'* | *nonexistent*) why='agent gone (No such file or directory)' ;;
    *'Permission denied'*) why='agent terminated (Permission denied)' ;;
    *'Invalid argument'*) why='refused (Invalid argument)' ;;
    *)  # the daemon restarting, say: the next round tries again
        log "$2 for $1: ${error##*: }; will retry"
        return 1 ;;
    esac
    log "$2 for $1: $why; skipped"
    return 0
}

# One round: read the file, fire what is due.  Sets `pause` (seconds to sleep after it) and
# returns 1 if the file cannot be read.
round() {
    pause=$poll
    soonest=
    if ! list=$(cat -- "$mnt/alarms" 2>&1); then
        fired=''  # the daemon went away: what was given up on may fare otherwise later
        if [ "${list##*: }" != "$read_error" ]; then
            read_error=${list##*: }
            if [ -n "$once" ]; then
                log "cannot read $mnt/alarms: $read_error"
            else
                log "cannot read $mnt/alarms: $read_error; trying again every ${poll}s"
            fi
        fi
        return 1
    fi
    if [ -n "$read_error" ]; then
        log "$mnt/alarms readable again"
        read_error=
    fi
    now=$(date +%s)
    still_fired='' still_bad='' did=''
    while read -r due npub id rest; do
        [ -z "$due$npub$id$rest" ] && continue
        line="$due${npub:+ $npub}${id:+ $id}${rest:+ $rest}"
        case $due in
        *[!0-9.]* | .* | *.*.* | 0*) ms= ;;
        *.???) ms=${due%.*}${due#*.} ;;
        *.*) ms= ;;
        *) ms=${due}000 ;;
        esac
        case $npub in npub1*) ;; *) ms= ;; esac
        case $npub in *[!0-9a-z]*) ms= ;; esac
        case ${id#alarm:} in "$id" | '' | *[!0-9.]*) ms= ;; esac
        if [ -z "$ms" ] || [ -n "$rest" ]; then
            case $nl$bad in
            *"$nl$line$nl"*) ;;
            *) log "ignoring a line of $mnt/alarms: '$line'" ;;
            esac
            still_bad="$still_bad$line$nl"
            continue
        fi
        key="$npub $id"
        case $nl$fired in
        *"$nl$key$nl"*) still_fired="$still_fired$key$nl"; continue ;;
        esac
        # Due at ms: fire once the clock's whole seconds have reached it (never early).
        need=$(((ms + 999) / 1000))
        if [ "$now" -ge "$need" ]; then
            [ -n "$stop" ] && break
            if fire "$npub" "$id" "$ms"; then
                still_fired="$still_fired$key$nl"
                did=1
            fi
        elif [ -z "$soonest" ] || [ "$need" -lt "$soonest" ]; then
            soonest=$need
        fi
    done <<EOF
$list
EOF
    fired=$still_fired
    bad=$still_bad
    if [ -n "$did" ]; then
        pause=0  # read again at once: a periodic alarm has its next due time now
    elif [ -n "$soonest" ] && [ $((soonest - now)) -lt "$poll" ]; then
        pause=$((soonest - now))
        [ "$pause" -lt 1 ] && pause=1
    fi
    return 0
}

if [ -n "$once" ]; then
    round
    exit
fi
# nap SECONDS: sleep, but wake as soon as a trapped signal comes (wait returns then, where
# a foreground sleep would run to its end first).
nap() {
    sleep "$1" &
    sleeper=$!
    wait "$sleeper"
    [ -n "$stop" ] && kill "$sleeper" 2>/dev/null
}

# Whole seconds cannot say when in its second a due time is passed.  Where sleep takes a
# fraction (most do, though POSIX does not ask it), the last second before an alarm is
# watched in tenths, so that the alarm fires just after the clock turns, not up to 1s late.
fine=
sleep 0.01 2>/dev/null && fine=1

log "watching $mnt/alarms (poll ${poll}s)"
while [ -z "$stop" ]; do
    round
    if [ -n "$stop" ] || [ "$pause" -eq 0 ]; then
        continue
    fi
    if [ -n "$fine" ] && [ -n "$soonest" ] && [ "$soonest" -le $((now + 1)) ]; then
        naps=0
        while [ -z "$stop" ] && [ "$naps" -lt 15 ] && [ "$(date +%s)" -lt "$soonest" ]; do
            nap 0.1
            naps=$((naps + 1))
        done
    else
        nap "$pause"
    fi
done
log "stopping ($stop)"
exit 0
