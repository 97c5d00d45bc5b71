package scripts

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// includeDirective, alone on a line of a bootstrap script, stands for
// another script, less its #! line: a script for one CI builds on
// generic.sh's protocol instead of copying it.
//
//	# hangar:include builtin:generic.sh   the built-in script, as it is served
//	# hangar:include lib/common.sh        a file, relative to the including file's directory
//
// In a built-in script a bare name is another built-in script. Included
// scripts are not expanded again (a file's include lines are an error
// there), so includes cannot loop.
const includeDirective = "# hangar:include "

// includeTarget returns what an include line names.
func includeTarget(line []byte) (string, bool) {
	target, ok := strings.CutPrefix(strings.TrimRight(string(line), "\r\n"), includeDirective)
	return strings.TrimSpace(target), ok
}

// expandBuiltin expands a built-in script's includes, which name other
// built-in scripts, with or without "builtin:".
func expandBuiltin(name string, b []byte) ([]byte, error) {
	return expand(name, b, func(target string) ([]byte, error) {
		target = strings.TrimPrefix(target, "builtin:")
		return Bootstrap.ReadFile("bootstrap/" + target)
	})
}

// Expand returns the bootstrap script b, read from name, with its include
// lines replaced by what they name: "builtin:NAME" is that built-in
// script as it is served, anything else a file relative to dir (or an
// absolute path), read with read (os.ReadFile if nil). A script fetched
// from a URL has no dir (""): it may include built-in scripts only. Errors
// say which line of which file failed ("boot.sh:12: …"), and so does an
// include line in an included file.
func Expand(name string, b []byte, dir string, read func(path string) ([]byte, error)) ([]byte, error) {
	if read == nil {
		read = os.ReadFile
	}
	return expand(name, b, func(target string) ([]byte, error) {
		if builtin, ok := strings.CutPrefix(target, "builtin:"); ok {
			body, err := BootstrapScript(builtin)
			if err != nil {
				return nil, fmt.Errorf("no built-in bootstrap script %q", builtin)
			}
			return body, nil
		}
		if dir == "" {
			return nil, fmt.Errorf("a script fetched from a URL can include only built-in scripts (builtin:NAME)")
		}
		path := target
		if !filepath.IsAbs(path) {
			path = filepath.Join(dir, path)
		}
		body, err := read(path)
		if err != nil {
			if _, berr := Bootstrap.ReadFile("bootstrap/" + target); berr == nil && os.IsNotExist(err) {
				return nil, fmt.Errorf("%w (for the built-in script, write %sbuiltin:%s)", err, includeDirective, target)
			}
			return nil, err
		}
		for i, line := range bytes.SplitAfter(body, []byte("\n")) {
			if _, ok := includeTarget(line); ok {
				return nil, fmt.Errorf("%s:%d: an included file cannot include another: includes do not nest", path, i+1)
			}
		}
		return body, nil
	})
}

// expand replaces each include line of b with what load returns for its
// target, less a #! line. An error names name and the line.
func expand(name string, b []byte, load func(target string) ([]byte, error)) ([]byte, error) {
	if !bytes.Contains(b, []byte(includeDirective)) {
		return b, nil
	}
	var out bytes.Buffer
	for i, line := range bytes.SplitAfter(b, []byte("\n")) {
		target, ok := includeTarget(line)
		if !ok {
			out.Write(line)
			continue
		}
		if target == "" {
			return nil, fmt.Errorf("%s:%d: %snames no script", name, i+1, includeDirective)
		}
		body, err := load(target)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: including %s: %w", name, i+1, target, err)
		}
		if bytes.HasPrefix(body, []byte("#!")) {
			_, body, _ = bytes.Cut(body, []byte("\n"))
		}
		out.Write(body)
		if len(body) > 0 && !bytes.HasSuffix(body, []byte("\n")) {
			out.WriteByte('\n')
		}
	}
	return out.Bytes(), nil
}

// ExpandFile reads the bootstrap script at path and expands its includes
// against its directory, as Hangar serves it.
func ExpandFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Expand(path, b, filepath.Dir(path), nil)
}
