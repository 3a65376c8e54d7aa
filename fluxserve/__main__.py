from fluxserve.cli import main

main()
