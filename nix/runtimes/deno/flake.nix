{
  description = "atrun deno runtime (Deno 2): at-run-exec, OCI image.tar, Firecracker rootfs.ext4";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  # The shape is shared by every runtime: see ../../lib/runtime.nix. runtime.json says how
  # at-run-exec starts; `programs` says which package each of its placeholders names.
  outputs = { self, nixpkgs }:
    import ../../lib/runtime.nix {
      inherit nixpkgs;
      src = ./.;
      programs = pkgs: { python = pkgs.python3; deno = pkgs.deno; };
    };
}
