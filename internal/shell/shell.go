// Package shell holds Hangar's one quoting function and the name checks
// that keep names and env variables safe wherever they are written: shell
// text, cloud tags, file names, URLs. Every layer that builds shell text
// (user-data, bootstrap assignments, staging commands, `hangar run`) uses
// it, so there is one place to get right.
package shell

import (
	"fmt"
	"regexp"
	"strings"
)

// Quote quotes s as one POSIX shell word that stands for exactly s. Inside
// single quotes nothing is special but the quote itself, so each one is
// written by closing the quotes, adding \' and reopening them.
func Quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Unquote undoes Quote: ok is false for a word Quote did not write.
func Unquote(word string) (s string, ok bool) {
	if len(word) < 2 || word[0] != '\'' || word[len(word)-1] != '\'' {
		return "", false
	}
	s = strings.ReplaceAll(word[1:len(word)-1], `'\''`, "'")
	if Quote(s) != word {
		return "", false // not Quote's: 'a' 'b', 'it's'
	}
	return s, true
}

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// ValidName checks the name of a pool, worker or instance. The pattern keeps
// names safe in tags, file names, URLs and DNS labels.
func ValidName(s string) error {
	if !nameRE.MatchString(s) {
		return fmt.Errorf("invalid name %q: use 1 to 63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit", s)
	}
	return nil
}

// reservedEnvNames change how bash itself runs the scripts the pool env is
// exported to (SHELLOPTS=xtrace would echo the token), or what every
// program the bootstrap starts loads, so a pool may not set them.
var reservedEnvNames = map[string]bool{"BASH_ENV": true, "ENV": true, "SHELLOPTS": true, "BASHOPTS": true, "LD_PRELOAD": true, "LD_AUDIT": true}

// ValidEnvName checks the name of a pool env variable. The prefix HANGAR_ is
// reserved for the variables the user-data and bootstrap scripts set.
func ValidEnvName(s string) error {
	switch {
	case !envNameRE.MatchString(s):
		return fmt.Errorf("invalid env name %q: use letters, digits and '_', not starting with a digit", s)
	case strings.HasPrefix(s, "HANGAR_"):
		return fmt.Errorf("invalid env name %q: the prefix HANGAR_ is reserved for Hangar's own variables", s)
	case reservedEnvNames[s]:
		return fmt.Errorf("invalid env name %q: it changes how the bootstrap script runs", s)
	}
	return nil
}
