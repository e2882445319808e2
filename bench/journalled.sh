#!/bin/sh
# Make and loop-mount a journalled ext4 for the benches (bench/fsinfo.py prints what each
# bench ran on). The image is sparse, made with plain mkfs.ext4 (its defaults include
# has_journal), under /var/tmp; root only.
#
#   sh bench/journalled.sh          # make (if needed) and mount; prints the --dir to use
#   sh bench/journalled.sh down     # unmount and delete the image
#
# Then e.g.: .venv/bin/python bench/smtp.py --dir /mnt/pyqmail-bench --runs 3
set -eu
IMG=${PYQMAIL_BENCH_IMG:-/var/tmp/pyqmail-bench.img}
MNT=${PYQMAIL_BENCH_MNT:-/mnt/pyqmail-bench}
SIZE=${PYQMAIL_BENCH_SIZE:-4G}
if [ "${1:-up}" = down ]; then
  if mountpoint -q "$MNT"; then umount "$MNT"; fi
  rm -f "$IMG"
  rmdir "$MNT" 2>/dev/null || true
  echo "unmounted $MNT, removed $IMG"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "$0: needs root (mount)" >&2; exit 1; }
if ! mountpoint -q "$MNT"; then
  if [ ! -e "$IMG" ]; then
    truncate -s "$SIZE" "$IMG"
    mkfs.ext4 -q -F "$IMG"
  fi
  mkdir -p "$MNT"
  mount -o loop "$IMG" "$MNT"
  chmod 755 "$MNT" # Postfix (user postfix) and the delivery users must reach their dirs
fi
dev=$(findmnt -n -o SOURCE "$MNT")
features=$(dumpe2fs -h "$dev" 2>/dev/null | sed -n 's/^Filesystem features: *//p')
case " $features " in
*" has_journal "*) echo "$MNT: ext4 on $dev ($IMG), journal: yes" ;;
*) echo "$MNT: ext4 on $dev ($IMG) has NO journal: features $features" >&2; exit 1 ;;
esac
echo "run the benches with --dir $MNT; unmount with: sh $0 down"
