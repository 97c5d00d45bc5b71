// Command hangar serves pools of CI build instances and is the client of a
// running server. See README.md.
package main

import "os"

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }
