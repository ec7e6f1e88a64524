# A stand-in for the part of nixpkgs' `lib` that the CIM Nix files use, written for this
# project (no nixpkgs code), so that the modules and the flake evaluate on a machine that has
# only a Nix evaluator (Debian's nix-bin) and no nixpkgs:
#
# - general helpers (genAttrs, optionalAttrs, mapAttrs', ...);
# - option declarations (mkOption, mkEnableOption) and the properties mkIf, mkMerge,
#   mkOverride/mkDefault/mkForce;
# - option types with real checks (an out-of-range integer, a string that does not match,
#   an unknown enum value are refused) and merging (lists concatenate, attribute sets merge,
#   scalars must agree, submodules evaluate);
# - a module evaluator (evalModules): imports with de-duplication by key or file, module
#   functions called with { config, options, lib, ... } and special arguments, definitions
#   pushed through mkIf/mkMerge/mkOverride down to the options, priorities, defaults, and
#   an error for every definition of an option that was never declared.
#
# It follows the documented behaviour of the NixOS module system closely enough for these
# modules; it is not a replacement for it. On a Nix machine the same tests can run against
# the real nixpkgs lib instead (see docs/deploy.md).
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatMap
    concatStringsSep
    elem
    elemAt
    filter
    foldl'
    functionArgs
    genList
    head
    intersectAttrs
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    match
    stringLength
    substring
    toJSON
    typeOf
    ;

  # ---------------------------------------------------------------- general helpers

  genAttrs =
    names: f:
    listToAttrs (
      map (n: {
        name = n;
        value = f n;
      }) names
    );
  nameValuePair = name: value: { inherit name value; };
  mapAttrs' = f: set: listToAttrs (map (n: f n set.${n}) (attrNames set));
  mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
  filterAttrs =
    pred: set:
    listToAttrs (concatMap (n: if pred n set.${n} then [ (nameValuePair n set.${n}) ] else [ ]) (attrNames set));
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: set: if cond then set else { };
  optionalString = cond: s: if cond then s else "";
  range = first: last: if first > last then [ ] else genList (n: first + n) (last - first + 1);
  concatMapStrings = f: list: concatStringsSep "" (map f list);
  imap1 = f: list: genList (i: f (i + 1) (elemAt list i)) (length list);
  last = list: elemAt list (length list - 1);
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  recursiveUpdate =
    a: b:
    a
    // mapAttrs (n: v: if isAttrs v && isAttrs (a.${n} or null) then recursiveUpdate a.${n} v else v) b;
  showOption = loc: concatStringsSep "." loc;

  # A short, always printable rendering of a definition for error messages.
  showValue =
    v:
    if isString v || isInt v || isBool v || isFloat v || v == null then
      toJSON v
    else if isPath v then
      toString v
    else if isList v then
      "[ ${concatStringsSep " " (map showValue v)} ]"
    else if isAttrs v && (v.type or null) == "derivation" then
      "<derivation ${v.name or "?"}>"
    else if isAttrs v then
      "{ ${concatStringsSep "; " (attrNames v)}; }"
    else
      "<${typeOf v}>";

  # ---------------------------------------------------------------- properties

  isType = t: v: isAttrs v && (v._type or null) == t;

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  defaultPriority = 100;
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;

  mkOption = attrs: attrs // { _type = "option"; };
  isOption = isType "option";
  mkEnableOption =
    what:
    mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${what}.";
    };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };
  literalMD = text: {
    _type = "literalMD";
    inherit text;
  };

  # One definition (`{ file, value }`) of an attribute set, as a list of plain attribute
  # sets: mkMerge is split, and mkIf/mkOverride move one level down onto every attribute,
  # so that the names a definition sets are known without evaluating its conditions.
  pushDown =
    loc: def:
    let
      go =
        v:
        if isType "merge" v then
          concatMap go v.contents
        else if isType "if" v then
          map (mapAttrs (_: mkIf v.condition)) (go v.content)
        else if isType "override" v then
          map (mapAttrs (_: mkOverride v.priority)) (go v.content)
        else if isAttrs v then
          [ v ]
        else
          throw "The option `${showOption loc}' is an attribute set of options, but its definition in `${def.file}' is ${showValue v}.";
    in
    map (value: {
      inherit (def) file;
      inherit value;
    }) (go def.value);

  # One definition of a single option, as plain values with their priority: mkMerge is
  # split, a false mkIf drops its content, mkOverride sets the priority.
  discharge =
    loc: def:
    let
      go =
        priority: v:
        if isType "merge" v then
          concatMap (go priority) v.contents
        else if isType "if" v then
          if !isBool v.condition then
            throw "The condition of a mkIf in `${def.file}' (option `${showOption loc}') is not a boolean: ${showValue v.condition}."
          else if v.condition then
            go priority v.content
          else
            [ ]
        else if isType "override" v then
          go (if priority == null then v.priority else priority) v.content
        else
          [
            {
              inherit (def) file;
              value = v;
              priority = if priority == null then defaultPriority else priority;
            }
          ];
    in
    go null def.value;

  # Merges the definitions of one option of type `type` at `loc`: only those with the
  # best (lowest) priority count, each must pass the type's check, then the type merges them.
  mergeDefinitions =
    loc: type: defs:
    let
      plain = concatMap (discharge loc) defs;
      best = foldl' (m: d: if d.priority < m then d.priority else m) 1000000 plain;
      winners = filter (d: d.priority == best) plain;
      checked = map (
        d:
        if type.check d.value then
          d
        else
          throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition value in `${d.file}': ${showValue d.value}"
      ) winners;
    in
    {
      isDefined = winners != [ ];
      value =
        if winners == [ ] then
          throw "The option `${showOption loc}' is used but not defined."
        else
          type.merge loc checked;
    };

  # ---------------------------------------------------------------- types

  mkOptionType =
    {
      name,
      description ? name,
      check ? (_: true),
      merge ? mergeEqual,
      ...
    }@args:
    args
    // {
      _type = "option-type";
      inherit
        name
        description
        check
        merge
        ;
    };

  mergeEqual =
    loc: defs:
    let
      first = (head defs).value;
    in
    if all (d: d.value == first) defs then
      first
    else
      throw "The option `${showOption loc}' has conflicting definition values: ${
        concatStringsSep ", " (map (d: "${showValue d.value} in `${d.file}'") defs)
      }.";

  int = mkOptionType {
    name = "int";
    description = "signed integer";
    check = isInt;
  };
  intBetween =
    lo: hi:
    mkOptionType {
      name = "intBetween";
      description = "integer between ${toString lo} and ${toString hi} (both inclusive)";
      check = x: isInt x && lo <= x && x <= hi;
    };

  attrsMerge =
    elemType: loc: defs:
    let
      sets = concatMap (pushDown loc) defs;
      names = unique (concatMap (s: attrNames s.value) sets);
      merged = map (n: {
        name = n;
        value = mergeDefinitions (loc ++ [ n ]) elemType (
          concatMap (s: if s.value ? ${n} then [ (s // { value = s.value.${n}; }) ] else [ ]) sets
        );
      }) names;
    in
    listToAttrs (map (m: m // { value = m.value.value; }) (filter (m: m.value.isDefined) merged));

  submoduleWith =
    {
      modules,
      specialArgs ? { },
    }:
    mkOptionType {
      name = "submodule";
      check = x: isAttrs x || isFunction x || isPath x;
      merge =
        loc: defs:
        (evalModules {
          prefix = loc;
          specialArgs = specialArgs // {
            name = last loc;
          };
          modules =
            modules
            ++ map (
              d:
              if isAttrs d.value then
                {
                  _file = d.file;
                  config = d.value;
                }
              else
                d.value
            ) defs;
        }).config;
    };

  types = rec {
    inherit mkOptionType;

    anything = mkOptionType {
      name = "anything";
      merge =
        loc: defs:
        if all (d: isAttrs d.value && !(d.value ? _type) && (d.value.type or null) != "derivation") defs then
          attrsMerge anything loc defs
        else
          mergeEqual loc defs;
    };
    unspecified = mkOptionType {
      name = "unspecified";
      merge =
        loc: defs:
        if all (d: isList d.value) defs then
          concatMap (d: d.value) defs
        else if all (d: isAttrs d.value) defs then
          foldl' (a: d: a // d.value) { } defs
        else
          mergeEqual loc defs;
    };
    bool = mkOptionType {
      name = "bool";
      description = "boolean";
      check = isBool;
    };
    inherit int;
    float = mkOptionType {
      name = "float";
      description = "floating point number";
      check = isFloat;
    };
    ints = {
      between = intBetween;
      positive = mkOptionType {
        name = "positiveInt";
        description = "positive integer, meaning >0";
        check = x: isInt x && x > 0;
      };
      unsigned = mkOptionType {
        name = "unsignedInt";
        description = "unsigned integer, meaning >=0";
        check = x: isInt x && x >= 0;
      };
    };
    port = intBetween 0 65535 // {
      name = "port";
      description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
    };
    str = mkOptionType {
      name = "str";
      description = "string";
      check = isString;
    };
    strMatching =
      pattern:
      mkOptionType {
        name = "strMatching";
        description = "string matching the pattern ${pattern}";
        check = x: isString x && match pattern x != null;
      };
    enum =
      values:
      mkOptionType {
        name = "enum";
        description = "one of ${concatStringsSep ", " (map showValue values)}";
        check = x: elem x values;
      };
    path = mkOptionType {
      name = "path";
      check = x: isPath x || (isString x && hasPrefix "/" x);
    };
    # A path given as a string. `inStore = false` refuses store paths and Nix path literals
    # (interpolating a path literal copies the file into the world-readable store).
    pathWith =
      {
        inStore ? null,
        absolute ? null,
      }:
      mkOptionType {
        name = "pathWith";
        description =
          concatStringsSep " " (
            optional (absolute == true) "absolute"
            ++ optional (inStore == false) "non-store"
            ++ optional (inStore == true) "store"
          )
          + " path (a string)";
        check =
          x:
          (isString x || (isPath x && inStore != false))
          && (absolute != true || hasPrefix "/" (toString x))
          && (inStore != false || !hasPrefix "${builtins.storeDir}/" (toString x))
          && (inStore != true || hasPrefix "${builtins.storeDir}/" (toString x));
      };
    package = mkOptionType {
      name = "package";
      check = x: isAttrs x && (x.type or null) == "derivation";
    };
    attrs = mkOptionType {
      name = "attrs";
      description = "attribute set";
      check = isAttrs;
      merge = _loc: defs: foldl' (a: d: a // d.value) { } defs;
    };

    nullOr =
      t:
      mkOptionType {
        name = "nullOr";
        description = "null or ${t.description}";
        check = x: x == null || t.check x;
        merge =
          loc: defs:
          if all (d: d.value == null) defs then
            null
          else if any (d: d.value == null) defs then
            throw "The option `${showOption loc}' is defined both null and not null."
          else
            t.merge loc defs;
      };
    listOf =
      t:
      mkOptionType {
        name = "listOf";
        description = "list of ${t.description}";
        check = isList;
        merge =
          loc: defs:
          concatLists (
            map (
              d:
              imap1 (
                i: x:
                (mergeDefinitions (loc ++ [ "[${toString i}]" ]) t [
                  {
                    inherit (d) file;
                    value = x;
                  }
                ]).value
              ) d.value
            ) defs
          );
      };
    attrsOf =
      t:
      mkOptionType {
        name = "attrsOf";
        description = "attribute set of ${t.description}";
        check = isAttrs;
        merge = attrsMerge t;
      };
    oneOf =
      ts:
      mkOptionType {
        name = "oneOf";
        description = concatStringsSep " or " (map (t: t.description) ts);
        check = x: any (t: t.check x) ts;
        merge =
          loc: defs:
          let
            fits = filter (t: all (d: t.check d.value) defs) ts;
          in
          if fits == [ ] then
            throw "The definitions of option `${showOption loc}' have no single type in common."
          else
            (head fits).merge loc defs;
      };
    either = a: b: oneOf [
      a
      b
    ];
    submodule = m: submoduleWith { modules = [ m ]; };
    inherit submoduleWith;
  };

  # ---------------------------------------------------------------- modules

  # Evaluates a list of modules: { config, options }. A module is an attribute set, a
  # function returning one, or a path to a file holding either. It may have `imports`,
  # `options`, `config`, `key` and `_file`; with neither `options` nor `config`, everything
  # but `imports`, `key` and `_file` is its config.
  evalModules =
    {
      modules,
      specialArgs ? { },
      prefix ? [ ],
    }:
    let
      moduleArgs =
        f:
        let
          available = {
            inherit config options;
            lib = self;
          }
          // specialArgs;
          wanted = functionArgs f;
        in
        if wanted == { } then available else intersectAttrs wanted available;

      load =
        parentFile: m:
        let
          fromFile = isPath m || isString m;
          file = if fromFile then toString m else parentFile;
          raw = if fromFile then import m else m;
          value = if isFunction raw then raw (moduleArgs raw) else raw;
        in
        if !isAttrs value then
          throw "A module in `${file}' is not an attribute set (nor a function returning one)."
        else
          {
            key = value.key or (if fromFile then file else null);
            file = value._file or file;
            inherit value;
          };

      # Depth first, each import before the module importing it; a key seen before (or a
      # file imported before) is skipped.
      collect =
        parentFile: acc: ms:
        foldl' (
          acc: m:
          let
            l = load parentFile m;
          in
          if l.key != null && elem l.key acc.keys then
            acc
          else
            let
              inner = collect l.file {
                keys = acc.keys ++ optional (l.key != null) l.key;
                inherit (acc) modules;
              } (l.value.imports or [ ]);
            in
            inner // { modules = inner.modules ++ [ (normalize l) ]; }
        ) acc ms;

      special = [
        "imports"
        "key"
        "_file"
        "meta"
      ];
      normalize =
        l:
        let
          v = l.value;
          explicit = v ? options || v ? config;
          extra = filter (n: !elem n (special ++ [ "options" "config" ])) (attrNames v);
        in
        if explicit && extra != [ ] then
          throw "Module `${l.file}' has an unsupported attribute `${head extra}': with `options' or `config' present, definitions belong inside `config'."
        else
          {
            inherit (l) file;
            options = v.options or { };
            config = if explicit then v.config or { } else builtins.removeAttrs v special;
          };

      collected = (collect "<unknown-file>" {
        keys = [ ];
        modules = [ ];
      } modules).modules;

      # All option declarations as one tree; declaring an option twice is an error.
      mergeDecls =
        loc: a: b:
        a
        // mapAttrs (
          n: v:
          if !(a ? ${n}) then
            v
          else if isOption v || isOption a.${n} then
            throw "The option `${showOption (loc ++ [ n ])}' is declared more than once."
          else
            mergeDecls (loc ++ [ n ]) a.${n} v
        ) b;
      options = foldl' (acc: m: mergeDecls prefix acc m.options) { } collected;

      evalOption =
        loc: opt: defs:
        let
          type = opt.type or types.unspecified;
          withDefault =
            defs
            ++ optional (opt ? default) {
              file = "the default of `${showOption loc}'";
              value = mkOptionDefault opt.default;
            };
        in
        (mergeDefinitions loc type withDefault).value;

      evalTree =
        loc: decls: defs:
        let
          sets = concatMap (pushDown loc) defs;
          unknown = filter (s: s.names != [ ]) (
            map (s: {
              inherit (s) file;
              names = filter (n: !(decls ? ${n})) (attrNames s.value);
            }) sets
          );
          first = head unknown;
          result = mapAttrs (
            name: decl:
            let
              sub = concatMap (s: if s.value ? ${name} then [ (s // { value = s.value.${name}; }) ] else [ ]) sets;
            in
            if isOption decl then evalOption (loc ++ [ name ]) decl sub else evalTree (loc ++ [ name ]) decl sub
          ) decls;
        in
        if unknown == [ ] then
          result
        else
          throw "The option `${showOption (loc ++ [ (head first.names) ])}' does not exist. Definition in `${first.file}'.";

      config = evalTree prefix options (
        map (m: {
          inherit (m) file;
          value = m.config;
        }) collected
      );
    in
    {
      inherit config options;
    };

  self = {
    inherit
      genAttrs
      nameValuePair
      mapAttrs'
      mapAttrsToList
      filterAttrs
      optional
      optionals
      optionalAttrs
      optionalString
      range
      concatMapStrings
      imap1
      last
      unique
      hasPrefix
      recursiveUpdate
      mkIf
      mkMerge
      mkOverride
      mkOptionDefault
      mkDefault
      mkForce
      mkOption
      mkEnableOption
      mkOptionType
      literalExpression
      literalMD
      types
      evalModules
      ;
    inherit (builtins)
      all
      any
      attrNames
      attrValues
      concatLists
      concatMap
      concatStringsSep
      elem
      filter
      foldl'
      head
      length
      listToAttrs
      mapAttrs
      ;

    importTOML = path: builtins.fromTOML (builtins.readFile path);
    importJSON = path: builtins.fromJSON (builtins.readFile path);
    getExe' = pkg: name: "${pkg}/bin/${name}";
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram or (throw "getExe: ${pkg.name or "?"} has no meta.mainProgram")}";
    licenses.asl20 = {
      spdxId = "Apache-2.0";
      shortName = "asl20";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];

    # lib.fileset, reduced to what flake.nix uses: a source is the root plus the listed
    # files and directories, each of which must exist under the root. Nothing is copied.
    fileset = {
      unions = paths: paths;
      toSource =
        { root, fileset }:
        let
          rootStr = toString root;
          check =
            p:
            let
              s = toString p;
            in
            if !builtins.pathExists p then
              throw "lib.fileset.toSource: ${s} does not exist."
            else if !hasPrefix "${rootStr}/" s then
              throw "lib.fileset.toSource: ${s} is not under the root ${rootStr}."
            else
              substring (stringLength rootStr + 1) (stringLength s) s;
        in
        {
          _type = "stub-source";
          files = map check fileset;
        };
    };
  };
in
self
