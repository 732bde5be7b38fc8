# A stand-in for nixpkgs, for offline CI: only the attributes nix/lib/runtime.nix uses, each a
# real derivation (so names, string contexts and drvPath are checked) whose builder refuses to
# run. Functions check their arguments against nixpkgs' own (25.11) so a misspelt argument or a
# value nixpkgs would reject fails here too. Nothing from here can be built: see nix/README.md.
{ system }:

let
  systems = [ "x86_64-linux" "aarch64-linux" ];

  fail = what: msg: throw "stub-nixpkgs: ${what}: ${msg}";

  typeIs = what: types: value:
    if builtins.elem (builtins.typeOf value) types then value
    else fail what "expected ${builtins.concatStringsSep " or " types}, got ${builtins.typeOf value}";

  isDrv = v: builtins.isAttrs v && (v.type or null) == "derivation";

  # Every attribute is forced (toJSON is deep) when drvPath is: functions and other values
  # that nixpkgs could not put in a derivation's environment fail here as they would there.
  mkDrv = name: attrs: derivation {
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo 'stub-nixpkgs: evaluation only; build with real nixpkgs (nix/README.md)' >&2; exit 1" ];
    stubArgs = builtins.toJSON attrs;
  };

  # A package: a derivation plus the usual pname/version.
  package = pname: version: mkDrv "${pname}-${version}" { } // { inherit pname version; };

  # Checks that `args` has the `required` names and no name outside `allowed`.
  checkArgs = what: required: allowed: args:
    let
      given = builtins.attrNames (typeIs what [ "set" ] args);
      unknown = builtins.filter (n: !(builtins.elem n (required ++ allowed))) given;
      missing = builtins.filter (n: !(args ? ${n})) required;
    in
    if unknown != [ ] then fail what "unexpected argument(s) ${builtins.concatStringsSep ", " unknown}"
    else if missing != [ ] then fail what "missing argument(s) ${builtins.concatStringsSep ", " missing}"
    else args;

  # OCI image config keys dockerTools passes through (image-spec config.md).
  ociConfigKeys = [
    "User" "ExposedPorts" "Env" "Entrypoint" "Cmd" "Volumes" "WorkingDir" "Labels"
    "StopSignal" "ArgsEscaped" "Memory" "MemorySwap" "CpuShares" "Healthcheck" "OnBuild" "Shell"
  ];

  compressors = { none = ""; gz = ".gz"; zstd = ".zst"; };

  buildLayeredImage = args0:
    let
      what = "dockerTools.buildLayeredImage";
      args = checkArgs what [ "name" ] [
        "tag" "fromImage" "contents" "config" "architecture" "created" "mtime" "uid" "gid"
        "uname" "gname" "maxLayers" "extraCommands" "fakeRootCommands" "enableFakechroot"
        "includeStorePaths" "includeNixDB" "passthru" "meta" "layeringPipeline" "debug"
        "compressor"
      ] args0;
      config = checkArgs "${what} config" [ ] ociConfigKeys (args.config or { });
      compressor = args.compressor or "gz";
      contents = typeIs "${what} contents" [ "list" "set" "path" "string" ] (args.contents or [ ]);
      contentsList = if builtins.isList contents then contents else [ contents ];
      baseName = baseNameOf (typeIs "${what} name" [ "string" ] args.name);
      tag = typeIs "${what} tag" [ "string" "null" ] (args.tag or null);
      envOk = builtins.all (e: builtins.match "[^=]+=.*" e != null) (config.Env or [ ]);
      listOfStrings = key: builtins.all builtins.isString (typeIs "${what} config.${key}" [ "list" ] (config.${key} or [ ]));
    in
    if !(compressors ? ${compressor}) then fail what "compressor must be one of none, gz, zstd"
    else if !envOk then fail what "config.Env entries must be NAME=value strings"
    else if !(listOfStrings "Entrypoint" && listOfStrings "Cmd" && listOfStrings "Env") then fail what "config.Entrypoint, Cmd and Env must be lists of strings"
    else if !(builtins.all (c: isDrv c || builtins.isPath c || builtins.isString c) contentsList) then fail what "contents must be derivations or paths"
    else if !(builtins.isString (args.extraCommands or "") && builtins.isString (args.fakeRootCommands or "")) then fail what "extraCommands and fakeRootCommands must be strings"
    else
      mkDrv "${baseName}.tar${compressors.${compressor}}" (builtins.removeAttrs args [ "passthru" "meta" ])
      // {
        imageName = args.name;
        imageTag = if tag == null then "stub" else tag;
      } // (args.passthru or { });

  # Like nixpkgs' writeTextFile, the script (with its #! line) is the derivation's `text`.
  writeShellScriptBin = name: text:
    let
      script = "#!${bash}/bin/bash\n" + typeIs "writeShellScriptBin text" [ "string" ] text;
    in
    mkDrv (typeIs "writeShellScriptBin name" [ "string" ] name) {
      text = script;
      destination = "/bin/${name}";
      executable = true;
    } // { text = script; meta.mainProgram = name; };

  runCommand = name: env: buildCommand:
    mkDrv (typeIs "runCommand name" [ "string" ] name)
      ((typeIs "runCommand env" [ "set" ] env) // {
        buildCommand = typeIs "runCommand buildCommand" [ "string" ] buildCommand;
      });

  closureInfo = args:
    let a = checkArgs "closureInfo" [ "rootPaths" ] [ ] args; in
    mkDrv "closure-info" { rootPaths = typeIs "closureInfo rootPaths" [ "list" ] a.rootPaths; };

  bash = package "bash" "5.2p37";
in
if !(builtins.elem system systems) then fail "system" "${system} is not one of ${builtins.concatStringsSep ", " systems}"
else {
  inherit system writeShellScriptBin runCommand closureInfo bash;
  dockerTools = { inherit buildLayeredImage; };
  python3 = package "python3" "3.13.9";
  deno = package "deno" "2.5.6";
  nodejs_22 = package "nodejs" "22.21.1";
  e2fsprogs = package "e2fsprogs" "1.47.3";
  fakeroot = package "fakeroot" "1.37.1";
}
