#!/bin/sh
# An example of a Tern custom bootloader command (bootloader backend "custom").
#
# The agent calls it once per operation, with one verb:
#
#   get-booted                 print the bootname the running system booted from
#   get-primary                print the bootname the next boot tries first (or nothing)
#   set-primary NAME ATTEMPTS  put NAME first in BOOT_ORDER, with ATTEMPTS attempts left
#   mark-good NAME ATTEMPTS    set NAME's attempts left to ATTEMPTS
#   mark-bad NAME              set NAME's attempts left to 0
#   get-attempts NAME          print NAME's attempts left (0 when unknown)
#
# Exit 0 on success; otherwise print one line on stderr and exit non-zero.
#
# This example keeps Tern's boot-counting model in a plain file of NAME=VALUE lines:
#
#   BOOT_ORDER=A B        bootnames, most preferred first
#   BOOT_A_LEFT=3         attempts left per slot
#   BOOTED=A              optional: the booted slot; without it, tern.slot=NAME is read
#                         from $TERN_CUSTOM_BOOT_CMDLINE (default /proc/cmdline)
#
# A real integration would talk to its firmware instead (an EFI variable, an EEPROM, a
# vendor tool); the contract above is what matters.
#
# Environment:
#   TERN_CUSTOM_BOOT_STATE  the state file (required)
#   TERN_CUSTOM_BOOT_LOG    if set, every call ("verb args...") is appended to this file
#   TERN_CUSTOM_BOOT_CMDLINE  the kernel command line to read get-booted from

set -eu
# BOOT_ORDER is split into words below; never expand them as file patterns.
set -f

state=${TERN_CUSTOM_BOOT_STATE:?TERN_CUSTOM_BOOT_STATE must name the state file}

if [ -n "${TERN_CUSTOM_BOOT_LOG:-}" ]; then
    printf '%s\n' "$*" >>"$TERN_CUSTOM_BOOT_LOG"
fi

die() {
    printf 'custom-bootloader: %s\n' "$*" >&2
    exit 1
}

# A bootname is 1 to 32 letters, digits, '_' or '-'; it is used in a regular expression
# and a variable name below, so anything else is refused.
check_name() {
    case $1 in
        '' | *[!A-Za-z0-9_-]*) die "invalid bootname '$1'" ;;
    esac
    [ "${#1}" -le 32 ] || die "bootname too long: '$1'"
}

check_number() {
    case $1 in
        '' | *[!0-9]*) die "invalid attempts '$1'" ;;
    esac
}

# get KEY: the value of KEY in the state file, empty when absent.
get() {
    [ -f "$state" ] || return 0
    sed -n "s/^$1=//p" "$state" | tail -n 1
}

# put KEY VALUE [KEY VALUE]...: set all pairs in one atomic replacement of the state file,
# so that BOOT_ORDER and a counter never change separately.
put() {
    tmp="$state.tmp.$$"
    if [ -f "$state" ]; then cp "$state" "$tmp"; else : >"$tmp"; fi
    while [ $# -ge 2 ]; do
        grep -v "^$1=" "$tmp" >"$tmp.next" || true
        printf '%s=%s\n' "$1" "$2" >>"$tmp.next"
        mv "$tmp.next" "$tmp"
        shift 2
    done
    mv "$tmp" "$state"
}

verb=${1:-}
if [ $# -gt 0 ]; then shift; fi

case $verb in
    get-booted)
        [ $# -eq 0 ] || die "usage: get-booted"
        booted=$(get BOOTED)
        if [ -z "$booted" ]; then
            cmdline=${TERN_CUSTOM_BOOT_CMDLINE:-/proc/cmdline}
            booted=$(tr ' ' '\n' <"$cmdline" | sed -n 's/^tern\.slot=//p' | tail -n 1)
        fi
        [ -n "$booted" ] || die "booted slot unknown (no BOOTED in $state, no tern.slot= on the command line)"
        printf '%s\n' "$booted"
        ;;
    get-primary)
        [ $# -eq 0 ] || die "usage: get-primary"
        # The first word of BOOT_ORDER; nothing when the order is empty.
        for name in $(get BOOT_ORDER); do
            printf '%s\n' "$name"
            break
        done
        ;;
    set-primary)
        [ $# -eq 2 ] || die "usage: set-primary NAME ATTEMPTS"
        check_name "$1"
        check_number "$2"
        order=$1
        for name in $(get BOOT_ORDER); do
            [ "$name" = "$1" ] || order="$order $name"
        done
        put BOOT_ORDER "$order" "BOOT_$1_LEFT" "$2"
        ;;
    mark-good)
        [ $# -eq 2 ] || die "usage: mark-good NAME ATTEMPTS"
        check_name "$1"
        check_number "$2"
        put "BOOT_$1_LEFT" "$2"
        ;;
    mark-bad)
        [ $# -eq 1 ] || die "usage: mark-bad NAME"
        check_name "$1"
        put "BOOT_$1_LEFT" 0
        ;;
    get-attempts)
        [ $# -eq 1 ] || die "usage: get-attempts NAME"
        check_name "$1"
        left=$(get "BOOT_$1_LEFT")
        printf '%s\n' "${left:-0}"
        ;;
    *)
        die "unknown verb '$verb'"
        ;;
esac
