{
  "targets": [
    {
      "target_name": "snapstream",
      "sources": [
        "native/addon.cc",
        "native/file.cc",
        "native/slabs.cc",
        "native/syscalls.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        # A completion delivered while a worker thread's environment is being
        # terminated cannot call into JS; without this the failed rethrow
        # escapes the callback and aborts the whole process.
        "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS",
        "_GNU_SOURCE",
        "_FILE_OFFSET_BITS=64"
      ],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++14", "-std=gnu++17"],
      "cflags_cc": ["-std=c++17", "-fexceptions", "-Wall", "-Wextra", "-O2"],
      "conditions": [
        ["'<!(echo $SNAPSTREAM_SANITIZE)'=='1'", {
          "cflags_cc": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"],
          "ldflags": ["-fsanitize=address,undefined"]
        }]
      ]
    }
  ]
}
