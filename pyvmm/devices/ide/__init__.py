"""Legacy IDE: a PIIX-style controller with up to four ATA disks on its two channels."""
