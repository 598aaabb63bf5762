#!/bin/sh
# cmake and a C++ compiler for building llama-cpp-python from its sdist: installed from Debian when missing.
set -e
missing=""
command -v cmake >/dev/null 2>&1 || missing="$missing cmake"
command -v c++ >/dev/null 2>&1 || missing="$missing g++"
[ -z "$missing" ] && exit 0
echo "installing from Debian:$missing"
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "error: cmake and g++ are needed to build llama-cpp-python; install$missing (as root)" >&2; exit 1; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq $missing
