package openapi_test

import (
	"encoding/json"
	"fmt"

	"voicegate/openapi"
)

// The document is plain JSON: any OpenAPI tool reads it as it is.
func Example() {
	var doc struct {
		OpenAPI string         `json:"openapi"`
		Paths   map[string]any `json:"paths"`
	}
	if err := json.Unmarshal(openapi.Document(), &doc); err != nil {
		panic(err)
	}
	_, chat := doc.Paths["/api/v2/chat/stream"]
	fmt.Println(doc.OpenAPI, chat)
	// Output: 3.1.0 true
}
