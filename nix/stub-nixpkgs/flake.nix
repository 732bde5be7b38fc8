{
  description = "Stub nixpkgs for offline evaluation checks of the atrun runtime flakes (nix/check.sh); nothing in it builds";

  outputs = { self }: {
    legacyPackages = builtins.listToAttrs (map
      (system: { name = system; value = import ./default.nix { inherit system; }; })
      [ "x86_64-linux" "aarch64-linux" ]);
  };
}
