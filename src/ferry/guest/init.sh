#!/bin/sh
# /init of the ferry test guest (busybox sh, PID 1), built by ferry.guest.build.
#
# The guest counts: it finds the newest record on its disks, prints
# "ferry-guest up last-seq=N", then every 200 ms writes record N+1, N+2, ...
# to every disk in turn (vda, vdb, vdc, ...), makes each durable and only
# then prints "seq N". Tests read the disks back with
# ferry.guest.records.read_records to see how far the guest got, and check
# with ferry.guest.records.instant_mismatch that a copy of all the disks
# (a recovery point, an export) was cut at one instant.
#
# Several disks. Each disk has its own slots (its size / 4096) and its own
# wrap-around; record n goes to slot (n - 1) % slots of each. At boot the
# guest finds the newest record of each disk and continues from the highest
# (MAX). Disks that disagree:
#   - a disk at MAX - 1 is what a copy cut in the middle of a round leaves
#     (record MAX had reached the disks before it, not this one): the guest
#     first finishes that round, writing record MAX to it, so every disk
#     holds an unbroken history again;
#   - a disk further behind (an empty disk added, a disk from another copy)
#     is not filled in (that could take a write per slot): it joins at
#     MAX + 1 and has a gap in its history. The binary search for the newest
#     record assumes no gap and reads such a disk low, so a disk found
#     behind MAX also gets a look at the slots where MAX and MAX - 1 belong;
#     MAX itself comes from the disks that were at MAX at boot, which go on
#     unbroken (vda, the first disk written in every round, is one of them
#     in any consistent copy).
# With more than one disk the guest prints "ferry-guest disks vda=N vdb=M
# ..." (each disk's newest record as found) before the up line; with one
# disk it prints exactly what it always did.
#
# Record format (version 1). The canonical description is the docstring of
# ferry/guest/records.py, and this script must write exactly the bytes of
# records.encode_record(seq). In short: one 4096-byte block at slot
# (seq - 1) % (disk size / 4096), made of text lines:
#   header (128 bytes): "FERRYREC1 " + seq as 20 digits + " " + sha256 hex
#                       of bytes 128..4095 + 32 spaces + "\n"
#   62 body lines (64 bytes each): "ferry-guest record " + seq as 20 digits +
#                       " line " + line number (00..61) + 16 dots + "\n"
#
# Kernel parameters read from /proc/cmdline:
#   ferry.dirty=SIZE  (bytes, or with a K/M/G suffix) keep rewriting that
#                     much memory in the background, for live-migration tests.
#   ferry.dirty_pause=SECONDS  sleep that long after each pass of ferry.dirty,
#                     so the guest dirties at most SIZE per that many seconds
#                     (a rate tests can count on; none: as fast as it can).
#   ferry.fs=DISK     DISK (e.g. vdb) holds a file system the test made: no
#                     records go to it; it is mounted at /mnt/fs and every
#                     200 ms the guest writes file fN there (N after the
#                     highest found), syncs, and prints "ferry-guest file N
#                     synced". A file reads "ferry-guest file N" and a newline.
#   ferry.agent=off   do not start qemu-ga even if the VM has its channel.
#   ferry.acpi=off    ignore the ACPI power button (no acpid).
# With the guest agent's channel (vm create --guest-agent) and qemu-ga in the
# initramfs, the guest runs qemu-ga on it and prints "ferry-guest agent up".
#
# Anything else this script prints starts with "ferry-guest "; a fatal error
# prints "ferry-guest error: ..." and powers the VM off.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

RECORD=/tmp/record      # the record being written
BODY=/tmp/body          # its bytes 128..4095
PROBE=/tmp/probe        # a block read back from the disk
ZEROS=00000000000000000000
LINES="00 01 02 03 04 05 06 07 08 09 10 11 12 13 14 15 16 17 18 19 20
21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44
45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61"

fail() {
	echo "ferry-guest error: $*"
	sync
	poweroff -f
	sleep 60
}

# Sets DIGITS to $1 as 20 zero-padded digits.
pad20() {
	DIGITS=$ZEROS$1
	DIGITS=${DIGITS#"${DIGITS%????????????????????}"}
}

# Sets SEQ to the seq of the valid record in slot $1 of disk $DEV, or to ""
# if the block there is blank, foreign or torn. Called O(log slots) times per
# disk at boot.
slot_seq() {
	SEQ=
	dd if="$DEV" of=$PROBE bs=4096 skip="$1" count=1 2>/dev/null || return 0
	magic= digits= sum=
	read -r magic digits sum rest <$PROBE
	[ "$magic" = FERRYREC1 ] || return 0
	case $digits in
	*[!0-9]*) return 0 ;;
	????????????????????) ;;
	*) return 0 ;;
	esac
	set -- $(tail -c 3968 $PROBE | sha256sum)
	[ "$1" = "$sum" ] || return 0
	SEQ=${digits#"${digits%%[!0]*}"}
}

# Sets LAST to the newest seq on disk $DEV of $SLOTS slots (0 if none).
# Slots 0..k hold s0..s0+k
# and every later slot something else, so binary-search for the last slot s
# whose seq is s0 + s. If slot 0 is not valid, the write that wrapped around
# was torn: then the newest record is in the last slot, if it belongs there.
find_last() {
	slot_seq 0
	base=$SEQ
	if [ -z "$base" ]; then
		slot_seq $((SLOTS - 1))
		if [ -n "$SEQ" ] && [ $((SEQ % SLOTS)) -eq 0 ]; then
			LAST=$SEQ
		else
			LAST=0
		fi
		return
	fi
	lo=0
	hi=$SLOTS
	while [ $((hi - lo)) -gt 1 ]; do
		mid=$(((lo + hi) / 2))
		slot_seq $mid
		if [ "$SEQ" = $((base + mid)) ]; then lo=$mid; else hi=$mid; fi
	done
	LAST=$((base + lo))
}

# Builds record $1 in $RECORD (the same bytes for every disk).
make_record() {
	pad20 "$1"
	# printf reuses its format for each line number in $LINES.
	# shellcheck disable=SC2086
	printf "ferry-guest record $DIGITS line %s................\n" $LINES >$BODY
	set -- "$1" $(sha256sum $BODY)
	printf 'FERRYREC1 %s %s                                \n' "$DIGITS" "$2" >$RECORD
	cat $BODY >>$RECORD
}

# Writes record $3 (built in $RECORD) to its slot of disk $1 of $2 slots and
# returns once it is on the disk.
put_record() {
	dd if=$RECORD of="/dev/$1" bs=4096 seek=$((($3 - 1) % $2)) count=1 \
		conv=notrunc,fsync 2>/dev/null || fail "cannot write record $3 to /dev/$1"
}

# Sets DISKS to the guest's virtio disks in the order QEMU gave them (vda,
# vdb, ..., vdz, vdaa, ...), once every virtio block device the kernel found
# has its /dev node: "vda" alone could leave a later disk unwritten.
find_disks() {
	want=0
	for dev in /sys/bus/virtio/devices/*; do
		[ -f "$dev/device" ] || continue
		read -r id <"$dev/device"
		[ "$id" = 0x0002 ] && want=$((want + 1)) # virtio device id 2: block
	done
	tries=0
	while :; do
		DISKS=
		count=0
		for node in /sys/block/vd? /sys/block/vd??; do
			disk=${node#/sys/block/}
			[ -e "$node" ] && [ -b "/dev/$disk" ] || continue
			DISKS="$DISKS $disk"
			count=$((count + 1))
		done
		case " $DISKS " in
		*" vda "*) [ $count -ge $want ] && return ;;
		esac
		tries=$((tries + 1))
		if [ $tries -gt 300 ]; then
			[ $count -gt 0 ] || fail "no /dev/vda after 30 s: give the VM a virtio-blk disk"
			fail "only$DISKS of $want virtio disks appeared after 30 s"
		fi
		sleep 0.1
	done
}

# Sets NOW to the uptime in centiseconds. ("1" + the two decimals - 100
# keeps a leading zero from reading as octal.)
uptime_cs() {
	read -r up _ </proc/uptime
	NOW=$((${up%.*} * 100 + 1${up#*.} - 100))
}

# Rewrites $1 bytes (rounded up to whole MiB) of a tmpfs file forever, with
# non-zero data that changes on every pass, so live migration always has
# changed pages to chase. Each pass builds a 1 MiB chunk tagged with the pass
# number by doubling a 32-byte line, then cat writes it over the whole file
# (no truncation: the same guest pages are rewritten every pass).
dirty_memory() {
	mib=$((($1 + 1048575) / 1048576))
	mkdir -p /run/dirty
	mount -t tmpfs -o size=$(((mib + 3) * 1048576)) tmpfs /run/dirty ||
		fail "cannot mount a tmpfs for ferry.dirty"
	chunks=
	i=0
	while [ $i -lt $mib ]; do
		chunks="$chunks /run/dirty/chunk"
		i=$((i + 1))
	done
	pass=0
	while :; do
		pass=$((pass + 1))
		printf '%-31.31s\n' "ferry-guest dirty pass $pass" >/run/dirty/chunk
		i=0
		while [ $i -lt 15 ]; do
			cat /run/dirty/chunk /run/dirty/chunk >/run/dirty/double
			mv /run/dirty/double /run/dirty/chunk
			i=$((i + 1))
		done
		# shellcheck disable=SC2086
		cat $chunks 1<>/run/dirty/mem
		if [ -n "$2" ]; then sleep "$2"; fi
	done
}

# Sets DIRTY to the byte count of ferry.dirty= ("" when not given), and
# DIRTY_PAUSE to ferry.dirty_pause= (whole seconds, "" when not given).
parse_cmdline() {
	DIRTY=
	DIRTY_PAUSE=
	read -r cmdline </proc/cmdline
	for arg in $cmdline; do
		case $arg in
		ferry.dirty_pause=*)
			DIRTY_PAUSE=${arg#ferry.dirty_pause=}
			case $DIRTY_PAUSE in
			'' | *[!0-9]*) fail "bad kernel parameter $arg: use e.g. ferry.dirty_pause=4" ;;
			esac
			continue
			;;
		ferry.dirty=*) value=${arg#ferry.dirty=} ;;
		*) continue ;;
		esac
		number=${value%[KkMmGg]}
		case $number in
		'' | *[!0-9]*) fail "bad kernel parameter $arg: use e.g. ferry.dirty=128M" ;;
		esac
		number=${number#"${number%%[!0]*}"} # no octal surprises
		number=${number:-0}
		case $value in
		*[Kk]) DIRTY=$((number * 1024)) ;;
		*[Mm]) DIRTY=$((number * 1048576)) ;;
		*[Gg]) DIRTY=$((number * 1073741824)) ;;
		*) DIRTY=$number ;;
		esac
	done
}

# ACPI power button (QMP system_powerdown) -> clean poweroff, when the
# initramfs carries the modules for it.
start_acpid() {
	[ -f /lib/modules/evdev.ko ] && [ -f /lib/modules/button.ko ] || return 0
	insmod /lib/modules/evdev.ko && insmod /lib/modules/button.ko || return 0
	acpid -f -c /etc/acpi -l /dev/null -p /run/acpid.pid &
}

# Sets FSDISK, AGENT and ACPI from ferry.fs=, ferry.agent= and ferry.acpi=.
parse_guest_options() {
	FSDISK= AGENT=on ACPI=on
	read -r cmdline </proc/cmdline
	for arg in $cmdline; do
		case $arg in
		ferry.fs=*) FSDISK=${arg#ferry.fs=} ;;
		ferry.agent=*) AGENT=${arg#ferry.agent=} ;;
		ferry.acpi=*) ACPI=${arg#ferry.acpi=} ;;
		esac
	done
}

# qemu-ga on the port named org.qemu.guest_agent.0, when the VM has a
# virtio console device (id 3) and the initramfs has the agent. The port's
# name arrives from QEMU a moment after the module loads.
start_agent() {
	[ "$AGENT" = off ] && return 0
	[ -x /usr/sbin/qemu-ga ] && [ -f /lib/modules/virtio_console.ko ] || return 0
	found=
	for dev in /sys/bus/virtio/devices/*; do
		[ -f "$dev/device" ] || continue
		read -r id <"$dev/device"
		[ "$id" = 0x0003 ] && found=1
	done
	[ -n "$found" ] || return 0
	insmod /lib/modules/virtio_console.ko || fail "cannot load kernel module virtio_console"
	tries=0
	while [ $tries -lt 100 ]; do
		for port in /sys/class/virtio-ports/*; do
			[ -f "$port/name" ] || continue
			read -r pname <"$port/name" || continue
			[ "$pname" = org.qemu.guest_agent.0 ] && [ -c "/dev/${port##*/}" ] || continue
			/usr/sbin/qemu-ga -m virtio-serial -p "/dev/${port##*/}" -t /run \
				-f /run/qemu-ga.pid -d || fail "qemu-ga did not start"
			echo "ferry-guest agent up"
			return 0
		done
		tries=$((tries + 1))
		sleep 0.1
	done
	echo "ferry-guest agent: no port org.qemu.guest_agent.0 after 10 s"
}

# Writes, syncs and announces file fN on /mnt/fs forever (ferry.fs=DISK).
write_files() {
	mkdir -p /mnt/fs
	mount -t ext4 "/dev/$FSDISK" /mnt/fs || fail "cannot mount /dev/$FSDISK (ferry.fs)"
	n=0
	for f in /mnt/fs/f*; do
		[ -f "$f" ] || continue
		k=${f#/mnt/fs/f}
		case $k in '' | *[!0-9]*) continue ;; esac
		[ "$k" -gt $n ] && n=$k
	done
	while :; do
		n=$((n + 1))
		echo "ferry-guest file $n" >/mnt/fs/f$n || fail "cannot write /mnt/fs/f$n"
		sync
		echo "ferry-guest file $n synced"
		sleep 0.2
	done
}

# NICs (virtio device id 1): load virtio_net, give each ethN the address its
# MAC names, 10.213.X.Y/16 with X and Y the MAC's last two bytes (as
# ferry.core.network.guest_ip_of computes it; the lab's bridge is
# 10.213.0.1), print "ferry-guest net ethN MAC ADDRESS", and serve TCP echo on
# port 7 (busybox nc, one cat per connection: every byte sent comes back).
start_network() {
	nics=0
	for dev in /sys/bus/virtio/devices/*; do
		[ -f "$dev/device" ] || continue
		read -r id <"$dev/device"
		[ "$id" = 0x0001 ] && nics=$((nics + 1))
	done
	[ $nics -gt 0 ] || return 0
	for module in failover net_failover virtio_net; do
		[ -f /lib/modules/$module.ko ] || fail "the guest has no kernel module $module for its NIC"
		insmod /lib/modules/$module.ko || fail "cannot load kernel module $module"
	done
	ip link set lo up
	tries=0
	while :; do
		found=0
		for path in /sys/class/net/eth*; do
			[ -e "$path/address" ] && found=$((found + 1))
		done
		[ $found -ge $nics ] && break
		tries=$((tries + 1))
		[ $tries -gt 100 ] && fail "only $found of $nics NICs appeared after 10 s"
		sleep 0.1
	done
	for path in /sys/class/net/eth*; do
		nic=${path##*/}
		read -r mac <"$path/address"
		saved=$IFS
		IFS=:
		# shellcheck disable=SC2086
		set -- $mac
		IFS=$saved
		address=10.213.$((0x$5)).$((0x$6))
		ip link set "$nic" up || fail "cannot bring $nic up"
		ip addr add "$address/16" dev "$nic" || fail "cannot give $nic address $address"
		echo "ferry-guest net $nic $mac $address"
	done
	nc -ll -p 7 -e cat &
}

# A disk labelled FERRYBOOT holds the image the guest booted from
# (ferry/guest/bootable.py): print "ferry-guest boot-disks vdX ..." and
# write no records there. ferry.boot=TAG names the image booted.
skip_boot_disks() {
	kept=
	boot=
	for disk in $DISKS; do
		if dd if="/dev/$disk" bs=512 count=1 2>/dev/null | grep -q FERRYBOOT; then
			boot="$boot $disk"
		else
			kept="$kept $disk"
		fi
	done
	DISKS=$kept
	[ -z "$boot" ] || echo "ferry-guest boot-disks$boot"
	for arg in $(cat /proc/cmdline); do
		case $arg in
		ferry.boot=*) echo "ferry-guest booted tag=${arg#ferry.boot=}" ;;
		esac
	done
}

# Under UEFI: count this guest's boots in a variable of its UEFI variable
# store (efivarfs), printing "ferry-guest efi-boots=N", so a test sees the
# store carried by a move, an export, replication and failover.
EFI_GUID=6f3c1a52-9d4e-4b7a-8c21-5e0f9a7b3d16
count_efi_boots() {
	[ -d /sys/firmware/efi ] || return 0
	[ -f /lib/modules/efivarfs.ko ] && insmod /lib/modules/efivarfs.ko 2>/dev/null
	if ! mount -t efivarfs efivarfs /sys/firmware/efi/efivars; then
		echo "ferry-guest efi-boots unavailable (no efivarfs)"
		return 0
	fi
	# One new variable FerryBootN per boot: efivarfs marks variables it does
	# not know immutable when it mounts, but it may always create one.
	boots=1
	while [ -f /sys/firmware/efi/efivars/FerryBoot$boots-$EFI_GUID ]; do
		boots=$((boots + 1))
	done
	var=/sys/firmware/efi/efivars/FerryBoot$boots-$EFI_GUID
	# 4 bytes of attributes (non-volatile, boot and runtime access), then the value.
	printf '\007\000\000\000%s' $boots >$var || fail "cannot write UEFI variable $var"
	echo "ferry-guest efi-boots=$boots"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=1m tmpfs /run

parse_cmdline
parse_guest_options

for module in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
	insmod /lib/modules/$module.ko || fail "cannot load kernel module $module"
done
[ "$ACPI" = off ] || start_acpid
start_agent
start_network

find_disks
skip_boot_disks
count_efi_boots
if [ -n "$FSDISK" ]; then
	[ -b "/dev/$FSDISK" ] || fail "ferry.fs=$FSDISK: no such disk"
	DISKS=$(echo " $DISKS " | sed "s/ $FSDISK / /")
	write_files &
fi

# TARGETS: "disk:slots" of every disk, in order; FOUND: "disk:slots:newest";
# MAX: the highest newest seq of all disks.
TARGETS=
FOUND=
MAX=0
for disk in $DISKS; do
	read -r sectors </sys/block/$disk/size
	SLOTS=$((sectors / 8))
	[ "$SLOTS" -ge 1 ] || fail "/dev/$disk is smaller than 4096 bytes"
	DEV=/dev/$disk
	find_last
	TARGETS="$TARGETS $disk:$SLOTS"
	FOUND="$FOUND $disk:$SLOTS:$LAST"
	[ "$LAST" -gt "$MAX" ] && MAX=$LAST
done

# The binary search reads low on a disk whose history has a gap (one that
# joined late has a blank slot 0), so a disk behind MAX gets a look at the
# slots of MAX and MAX - 1 too. LAGGING: "disk:slots" of the disks at MAX - 1.
SUMMARY=
LAGGING=
for f in $FOUND; do
	disk=${f%%:*}
	slots_last=${f#*:}
	SLOTS=${slots_last%%:*}
	LAST=${slots_last#*:}
	DEV=/dev/$disk
	if [ "$LAST" -lt "$MAX" ]; then
		slot_seq $(((MAX - 1) % SLOTS))
		if [ "$SEQ" = "$MAX" ]; then
			LAST=$MAX
		elif [ "$MAX" -gt 1 ]; then
			slot_seq $(((MAX - 2) % SLOTS))
			[ "$SEQ" = $((MAX - 1)) ] && LAST=$SEQ
		fi
	fi
	SUMMARY="$SUMMARY $disk=$LAST"
	[ "$LAST" -eq $((MAX - 1)) ] && LAGGING="$LAGGING $disk:$SLOTS"
done
# shellcheck disable=SC2086
set -- $DISKS
[ $# -gt 1 ] && echo "ferry-guest disks$SUMMARY"

# Finish the round a copy cut short: record MAX onto the disks one behind.
if [ -n "$LAGGING" ]; then
	make_record $MAX
	for target in $LAGGING; do
		put_record "${target%:*}" "${target#*:}" $MAX
	done
fi

echo "ferry-guest up last-seq=$MAX"

if [ -n "$DIRTY" ] && [ "$DIRTY" -gt 0 ]; then
	dirty_memory "$DIRTY" "$DIRTY_PAUSE" &
	renice -n 19 -p $! >/dev/null
fi

# One record every 200 ms (20 centiseconds of /proc/uptime), whatever the
# write took; when behind (a paused VM, a slow host) go on without bursting.
seq=$MAX
uptime_cs
next=$NOW
while :; do
	seq=$((seq + 1))
	make_record $seq
	for target in $TARGETS; do
		put_record "${target%:*}" "${target#*:}" $seq
	done
	echo "seq $seq"
	next=$((next + 20))
	uptime_cs
	rest=$((next - NOW))
	if [ $rest -le 0 ]; then
		next=$NOW
	elif [ $rest -lt 10 ]; then
		sleep 0.0$rest
	else
		sleep 0.$rest
	fi
done
