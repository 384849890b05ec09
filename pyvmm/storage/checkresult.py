"""The result of `pyvmm img check`, whatever the format, with qemu-img's
exit codes and JSON fields."""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_CLEAN, EXIT_ERRORS, EXIT_CORRUPT, EXIT_LEAKS = 0, 1, 2, 3


@dataclass
class CheckResult:
    filename: str
    format: str = "qcow2"
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return EXIT_ERRORS
        if self.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if self.leaks else EXIT_CLEAN

    def as_json(self) -> dict:
        out = {"filename": self.filename, "format": self.format, "check-errors": self.check_errors,
               "image-end-offset": self.image_end_offset, "total-clusters": self.total_clusters,
               "allocated-clusters": self.allocated_clusters}
        for key, value in (("fragmented-clusters", self.fragmented_clusters),    # qemu-img omits zeros
                           ("compressed-clusters", self.compressed_clusters),
                           ("corruptions", self.corruptions), ("leaks", self.leaks),
                           ("corruptions-fixed", self.corruptions_fixed), ("leaks-fixed", self.leaks_fixed)):
            if value:
                out[key] = value
        return out

    def human(self) -> str:
        lines = list(self.messages)
        if self.leaks_fixed or self.corruptions_fixed:
            lines.append(f"The following inconsistencies were found and repaired:\n\n"
                         f"    {self.leaks_fixed} leaked clusters\n    {self.corruptions_fixed} corruptions\n")
            lines.append("Double checking the fixed image now...")
        if self.corruptions:
            lines.append(f"\n{self.corruptions} errors were found on the image.\n"
                         "Data may be corrupted, or further writes to the image may corrupt it.")
        if self.leaks:
            lines.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                         "This means waste of disk space, but no harm to data.")
        if not self.corruptions and not self.leaks and not self.check_errors:
            lines.append("No errors were found on the image.")
        total = max(self.total_clusters, 1)
        alloc = max(self.allocated_clusters, 1)
        lines.append(f"{self.allocated_clusters}/{self.total_clusters} = "
                     f"{100 * self.allocated_clusters / total:.2f}% allocated, "
                     f"{100 * self.fragmented_clusters / alloc:.2f}% fragmented, "
                     f"{100 * self.compressed_clusters / alloc:.2f}% compressed clusters")
        lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines)
