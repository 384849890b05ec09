"""Legacy IDE: a PIIX-style controller with an ATA disk on the primary channel."""
