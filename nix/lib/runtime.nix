# The shape every runtime flake shares (nix/runtimes/<name>/flake.nix calls this).
#
#   outputs = { self, nixpkgs }: import ../../lib/runtime.nix {
#     inherit nixpkgs;
#     src = ./.;
#     programs = pkgs: { python = pkgs.python3; };
#   };
#
# `src` is the runtime directory (at-run-exec, runtime.json, test bundle, wrapper). Its
# runtime.json "command" is the one definition of how at-run-exec is started; here each
# placeholder becomes a store path: {dir} the runtime directory copied to the store, and
# {python} {deno} {node} the program of the package `programs` gives for that name.
#
# Outputs, for x86_64-linux and aarch64-linux:
#   packages.<system>.at-run-exec  bin/at-run-exec: runtime.json's command, Nix-built runtime
#   packages.<system>.image        OCI/Docker image archive (uncompressed tar) for `docker load`
#   packages.<system>.rootfs       ext4 file system for Firecracker: the closure, at-run-exec, /sbin/init
#   packages.<system>.default      a directory with the seed's three artifacts by name:
#                                  at-run-exec, image.tar, rootfs.ext4
#   checks.<system>.selftest       runs the test bundle through the built at-run-exec
#
# Only builtins and a handful of well-known nixpkgs attributes are used (no nixpkgs.lib), so the
# same expression evaluates against nix/stub-nixpkgs/ (the offline CI check) and real nixpkgs.
{ nixpkgs
, src
, programs
, systems ? [ "x86_64-linux" "aarch64-linux" ]
}:

let
  spec = builtins.fromJSON (builtins.readFile (src + "/runtime.json"));
  name = spec.name;
  extension = spec.extension or "";

  # The executable each placeholder names inside its package.
  executables = { python = "python3"; deno = "deno"; node = "node"; };

  # Placeholder names used in runtime.json's command ("dir" is the runtime directory).
  placeholdersIn = word:
    builtins.concatMap (part: if builtins.isList part then part else [ ])
      (builtins.split "[{]([a-z0-9_]+)[}]" word);
  unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
  used = unique (builtins.filter (p: p != "dir")
    (builtins.concatMap placeholdersIn spec.command));

  # A fixed file system UUID per runtime (mkfs.ext4 picks a random one otherwise).
  uuid =
    let h = builtins.hashString "sha256" "atrun-rootfs-${name}";
        part = start: len: builtins.substring start len h;
    in "${part 0 8}-${part 8 4}-4${part 13 3}-8${part 17 3}-${part 20 12}";

  shellQuote = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";

  # The runtime directory in the store, without the flake's own files or Python caches, so
  # that editing flake.nix does not change at-run-exec.
  runtimeDir = builtins.path {
    path = src;
    name = "atrun-runtime-${name}";
    filter = path: type:
      let base = baseNameOf path; in
      !(builtins.elem base [ "flake.nix" "flake.lock" "__pycache__" "result" ]
        || builtins.match ".*\\.pyc" base != null);
  };

  forSystem = system:
    let
      pkgs = nixpkgs.legacyPackages.${system};
      given = programs pkgs;
      packageFor = p:
        if !(given ? ${p}) then
          throw "runtime ${name}: runtime.json uses {${p}} but the flake's `programs` gives no package for it"
        else if !(executables ? ${p}) then
          throw "runtime ${name}: no known executable for placeholder {${p}}"
        else given.${p};
      programOf = p: "${packageFor p}/bin/${executables.${p}}";
      runtimePackages = map packageFor used;

      # runtime.json's command with every placeholder replaced by its store path.
      expand = word:
        builtins.replaceStrings
          ([ "{dir}" ] ++ map (p: "{${p}}") used)
          ([ "${runtimeDir}" ] ++ map programOf used)
          word;
      command = map expand spec.command;

      at-run-exec = pkgs.writeShellScriptBin "at-run-exec" ''
        # atrun ${name} runtime: runtime.json's command with Nix-built programs.
        exec ${builtins.concatStringsSep " " (map shellQuote command)} "$@"
      '';

      uid = "1000";
      passwd = ''
        root:x:0:0:root:/root:/bin/false
        atrun:x:${uid}:${uid}:atrun worker:/tmp:/bin/false
        nobody:x:65534:65534:nobody:/var/empty:/bin/false
      '';
      group = ''
        root:x:0:
        atrun:x:${uid}:
        nobody:x:65534:
      '';

      image = pkgs.dockerTools.buildLayeredImage {
        name = "atrun-runtime-${name}";
        tag = "nix";
        contents = [ at-run-exec ] ++ runtimePackages;
        # Runs in the customisation layer's root as the build user; files stay owned by root.
        extraCommands = ''
          mkdir -p etc tmp
          chmod 1777 tmp
          printf '%s' ${shellQuote passwd} > etc/passwd
          printf '%s' ${shellQuote group} > etc/group
        '';
        config = {
          User = "${uid}:${uid}";
          Entrypoint = [ "/bin/at-run-exec" ];
          WorkingDir = "/tmp";
          Env = [ "PATH=/bin" "TMPDIR=/tmp" "HOME=/tmp" ];
          Labels = {
            "dev.atrun.runtime" = name;
            "dev.atrun.at-run-exec" = "${at-run-exec}/bin/at-run-exec";
          };
        };
        compressor = "none"; # image.tar, as the seed names it; `docker load -i` takes it as is
      };

      # PID 1 of the microVM: mounts, the protocol channel (vsock, else the serial console),
      # drops to the atrun user, runs at-run-exec, powers off. See nix/lib/init.py.
      python =
        if given ? python then "${given.python}/bin/python3"
        else throw "runtime ${name}: `programs` must give python: every at-run-exec is a Python launcher, and the microVM init is Python too";
      init = pkgs.writeShellScriptBin "atrun-init" ''
        exec ${python} -I -S ${./init.py} "$@"
      '';

      closure = pkgs.closureInfo { rootPaths = [ at-run-exec init ]; };

      rootfs = pkgs.runCommand "atrun-${name}-rootfs.ext4"
        { nativeBuildInputs = [ pkgs.e2fsprogs pkgs.fakeroot ]; }
        ''
          root=$PWD/root
          mkdir -p $root/nix/store $root/bin $root/sbin $root/etc \
            $root/dev $root/proc $root/sys $root/run $root/tmp $root/bundle
          xargs -I % cp -a % $root/nix/store/ < ${closure}/store-paths
          cp ${closure}/registration $root/nix-path-registration
          ln -s ${init}/bin/atrun-init $root/sbin/init
          ln -s ${at-run-exec}/bin/at-run-exec $root/bin/at-run-exec
          ${builtins.concatStringsSep "\n" (map (p: "ln -s ${programOf p} $root/bin/${executables.${p}}") used)}
          printf '%s' ${shellQuote passwd} > $root/etc/passwd
          printf '%s' ${shellQuote group} > $root/etc/group
          echo atrun-${name} > $root/etc/hostname

          # Size as nixos/lib/make-ext4-fs.nix does: inodes plus data, with slack.
          inodes=$(find $root | wc -l)
          blocks=$(du -s -c -B 4096 --apparent-size $root | tail -1 | awk '{ print int($1 * 1.25) }')
          bytes=$(( (2 * inodes + blocks) * 4096 + 16 * 1024 * 1024 ))
          truncate -s $bytes $out

          # fakeroot: every file owned by root in the image, /tmp world-writable and sticky.
          fakeroot sh -c "chown -R 0:0 $root && chmod 1777 $root/tmp && \
            mkfs.ext4 -q -F -L atrun-${name} -U ${uuid} -b 4096 -N $(( inodes + inodes / 4 + 64 )) \
              -E root_owner=0:0,hash_seed=${uuid} -d $root $out"
          fsck.ext4 -n -f $out
        '';

      default = pkgs.runCommand "atrun-${name}-artifacts" { } ''
        mkdir $out
        ln -s ${at-run-exec}/bin/at-run-exec $out/at-run-exec
        ln -s ${image} $out/image.tar
        ln -s ${rootfs} $out/rootfs.ext4
      '';

      selftest = pkgs.runCommand "atrun-${name}-selftest" { }
        ''
          export HOME=$TMPDIR
          cd $TMPDIR
          request='{"codePath":"${runtimeDir}/test-bundle${extension}","endpoint":"test","args":{"n":1},"permissions":{},"env":{},"timeout":30}'
          printf '%s\n' "$request" | ${at-run-exec}/bin/at-run-exec > answer.jsonl
          ${python} -I -S -c '
          import json, sys
          lines = [json.loads(l) for l in open("answer.jsonl")]
          assert lines[0] == {"ready": True}, lines
          assert lines[1]["success"] is True and lines[1]["data"] == {"ok": True, "echo": {"n": 1}}, lines
          print("atrun ${name} selftest: OK")
          '
          touch $out
        '';
    in
    {
      packages = { inherit at-run-exec image rootfs default; };
      checks = { inherit selftest; };
    };

  perSystem = builtins.listToAttrs (map (system: { name = system; value = forSystem system; }) systems);
in
{
  packages = builtins.mapAttrs (_: s: s.packages) perSystem;
  checks = builtins.mapAttrs (_: s: s.checks) perSystem;
}
