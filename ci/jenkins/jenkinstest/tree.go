package jenkinstest

import (
	"fmt"
	"strings"
)

// tree is a parsed ?tree= parameter of Jenkins's remote API, such as
// "items[id,task[name,url]]": the properties to keep, each with the tree of
// its own properties. Jenkins keeps "_class" in every object whatever the
// tree says, and ignores names that are not properties.
type tree map[string]tree

// all stands for every property, for the default views below.
const all = "*"

func parseTree(s string) (tree, error) {
	t, rest, err := parseList(s)
	if err != nil {
		return nil, err
	}
	if rest != "" {
		return nil, fmt.Errorf("unexpected %q in tree", rest)
	}
	return t, nil
}

func parseList(s string) (tree, string, error) {
	t := tree{}
	for {
		i := strings.IndexAny(s, ",[]")
		if i < 0 {
			i = len(s)
		}
		name := strings.TrimSpace(s[:i])
		s = s[i:]
		var sub tree
		if strings.HasPrefix(s, "[") {
			var err error
			sub, s, err = parseList(s[1:])
			if err != nil {
				return nil, "", err
			}
			if !strings.HasPrefix(s, "]") {
				return nil, "", fmt.Errorf("unclosed [ in tree")
			}
			s = s[1:]
		}
		if name != "" {
			t[name] = sub
		}
		if !strings.HasPrefix(s, ",") {
			return t, s, nil
		}
		s = s[1:]
	}
}

// prune keeps of v what t names. A property named without a sub-tree keeps
// a plain value whole but, as in Jenkins, only the class of an object; the
// name "*" keeps every property not named otherwise, whole.
func prune(v any, t tree) any {
	switch v := v.(type) {
	case map[string]any:
		out := map[string]any{}
		if c, ok := v["_class"]; ok {
			out["_class"] = c
		}
		_, keepAll := t[all]
		for k, x := range v {
			if sub, ok := t[k]; ok {
				out[k] = prune(x, sub)
			} else if keepAll {
				out[k] = x
			}
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = prune(x, t)
		}
		return out
	default:
		return v
	}
}
