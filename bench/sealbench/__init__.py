"""sealbench: the side-by-side benchmark behind `scripts/bench` (DESIGN §9, issue 6).

Modules: `util` (processes, statistics, cleanup), `targets` (what fio runs against: raw
file, sealvol FUSE volumes, qemu-storage-daemon LUKS export, loop + ext4), `fio` (job
runner, JSON parsed), `peers` (cipher vs openssl, kms-daemon vs moto_server, rekey vs
cryptsetup), `suite` (the whole run, interleaved), `report` (report.md and report.png).
"""
