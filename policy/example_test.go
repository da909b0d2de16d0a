package policy_test

import (
	"fmt"

	"voicegate/policy"
)

// Compile the built-in roles and ask what a few callers may do: editor inherits user, write
// implies read, admin:* covers every admin action, and a direct grant from the token counts too.
func ExampleCompileRoles() {
	rules, err := policy.CompileRoles(policy.DefaultRoles(), []string{"document:write", "admin:read"})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, q := range []struct {
		roles, grants []string
		perm          string
	}{
		{[]string{"user"}, nil, "chat:write"},
		{[]string{"user"}, nil, "document:write"},
		{[]string{"editor"}, nil, "document:write"},
		{[]string{"editor"}, nil, "document:delete"},
		{[]string{"admin"}, nil, "admin:read"},
		{[]string{"admin"}, nil, "billing:read"},
		{[]string{"super_admin"}, nil, "billing:read"},
		{[]string{"user"}, []string{"billing:write"}, "billing:read"},
	} {
		fmt.Printf("%v %v %s: %v\n", q.roles, q.grants, q.perm, rules.Allows(q.roles, q.grants, q.perm))
	}
	// Output:
	// [user] [] chat:write: true
	// [user] [] document:write: false
	// [editor] [] document:write: true
	// [editor] [] document:delete: false
	// [admin] [] admin:read: true
	// [admin] [] billing:read: false
	// [super_admin] [] billing:read: true
	// [user] [billing:write] billing:read: true
}
